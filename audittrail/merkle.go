package audittrail

import (
	"crypto/sha256"

	"golang.org/x/mod/sumdb/tlog"
)

// Each chain is also an RFC 6962 Merkle tree: leaf i is the row with seq
// i+1, its leaf hash SHA-256(0x00 ‖ canonical row) (tlog.RecordHash), inner
// nodes SHA-256(0x01 ‖ left ‖ right) (tlog.NodeHash). Signed checkpoints
// carry the tree's root, so anyone with the public key and the rows can
// check them, and the tree's standard hashing lets third-party tlog tools
// do the same.

// merkleRange is the right edge of a tree being built leaf by leaf: the
// roots of the perfect subtrees whose sizes are the set bits of n, largest
// first. The zero value is the empty tree.
type merkleRange struct {
	n     int64
	nodes []tlog.Hash
}

// appendLeaf adds the next leaf hash.
func (m *merkleRange) appendLeaf(h tlog.Hash) { m.appendSubtree(h, 0) }

// appendSubtree adds a perfect subtree of 2^level leaves whose root is h.
// The tree's size must be a multiple of 2^level (an aligned subtree, as
// coverRange returns).
func (m *merkleRange) appendSubtree(h tlog.Hash, level int) {
	for i := m.n >> uint(level); i&1 == 1; i >>= 1 {
		h = tlog.NodeHash(m.nodes[len(m.nodes)-1], h)
		m.nodes = m.nodes[:len(m.nodes)-1]
	}
	m.nodes = append(m.nodes, h)
	m.n += 1 << uint(level)
}

// root is the tree hash of the first n leaves.
func (m *merkleRange) root() tlog.Hash {
	if len(m.nodes) == 0 {
		return sha256.Sum256(nil) // RFC 6962: the hash of the empty tree
	}
	h := m.nodes[len(m.nodes)-1]
	for i := len(m.nodes) - 2; i >= 0; i-- {
		h = tlog.NodeHash(m.nodes[i], h)
	}
	return h
}

// treeNode is one node of a chain's tree: level 0 is a leaf; index counts
// the nodes of its level from the left.
type treeNode struct {
	Level int
	Index int64
	Hash  tlog.Hash
}

// coverRange returns the aligned perfect subtrees that exactly cover leaves
// [a, b), left to right (at most two per level).
func coverRange(a, b int64) []treeNode {
	var out []treeNode
	for a < b {
		level := 0
		for {
			next := int64(1) << uint(level+1)
			if a%next != 0 || a+next > b {
				break
			}
			level++
		}
		out = append(out, treeNode{Level: level, Index: a >> uint(level)})
		a += 1 << uint(level)
	}
	return out
}

// leafHash is tlog.RecordHash(canonical) computed without allocating: buf
// must hold 0x00 followed by the canonical encoding.
func leafHash(prefixed []byte) tlog.Hash { return sha256.Sum256(prefixed) }
