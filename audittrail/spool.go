package audittrail

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// The spool keeps batches the database could not take, one file (segment)
// per batch, named by a sequence number so replay follows the write order:
//
//	seg-00000000000000000042.spool = "MGSPOOL1" | len uint32 | crc32c uint32 | JSON []Record
//
// A segment is written to a temporary name, fsynced, renamed and the
// directory fsynced, so after a crash a segment is either whole or absent.
// Records are spooled after the writer linked them into its chain, so a
// replay writes exactly the rows (and chain) that were accepted, and the
// (chain_id, seq) key makes a replay of an already committed batch a no-op.
// A segment whose checksum fails is renamed *.corrupt, counted and logged.

const (
	spoolMagic  = "MGSPOOL1"
	spoolHeader = len(spoolMagic) + 8
	spoolPrefix = "seg-"
	spoolSuffix = ".spool"
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// errSpoolCorrupt marks a segment that fails its checksum or does not decode.
var errSpoolCorrupt = errors.New("spool segment corrupt")

type spoolSeg struct {
	seq  uint64
	size int64
}

// spool is safe for concurrent use (writer appends, replayer reads/removes).
type spool struct {
	dir  string
	lock *os.File

	mu    sync.Mutex
	segs  []spoolSeg
	next  uint64
	bytes int64
}

// openSpool opens dir (creating it), takes an exclusive lock on it so two
// processes never share one spool, and indexes the segments already there.
func openSpool(dir string) (*spool, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("creating spool dir %s: %w", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return nil, fmt.Errorf("opening spool lock: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("locking spool dir %s (is another meshguard using it?): %w", dir, err)
	}
	s := &spool{dir: dir, lock: lock, next: 1}
	entries, err := os.ReadDir(dir)
	if err != nil {
		s.close()
		return nil, fmt.Errorf("reading spool dir %s: %w", dir, err)
	}
	for _, e := range entries {
		name := e.Name()
		if strings.HasSuffix(name, ".tmp") {
			os.Remove(filepath.Join(dir, name)) // never renamed: its batch was not accepted into the spool
			continue
		}
		num, ok := strings.CutPrefix(name, spoolPrefix)
		num, ok2 := strings.CutSuffix(num, spoolSuffix)
		if !ok || !ok2 {
			continue
		}
		seq, err := strconv.ParseUint(num, 10, 64)
		if err != nil {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		s.segs = append(s.segs, spoolSeg{seq: seq, size: info.Size()})
		s.bytes += info.Size()
		s.next = max(s.next, seq+1)
	}
	slices.SortFunc(s.segs, func(a, b spoolSeg) int { return cmp.Compare(a.seq, b.seq) })
	return s, nil
}

func (s *spool) path(seq uint64) string {
	return filepath.Join(s.dir, fmt.Sprintf("%s%020d%s", spoolPrefix, seq, spoolSuffix))
}

// append writes recs as the newest segment, durably.
func (s *spool) append(recs []Record) (int64, error) {
	body, err := json.Marshal(recs)
	if err != nil {
		return 0, fmt.Errorf("encoding spool segment: %w", err)
	}
	buf := make([]byte, spoolHeader, spoolHeader+len(body))
	copy(buf, spoolMagic)
	binary.BigEndian.PutUint32(buf[len(spoolMagic):], uint32(len(body)))
	binary.BigEndian.PutUint32(buf[len(spoolMagic)+4:], crc32.Checksum(body, crcTable))
	buf = append(buf, body...)

	s.mu.Lock()
	seq := s.next
	s.next++
	s.mu.Unlock()

	final := s.path(seq)
	tmp := final + ".tmp"
	if err := writeFileSync(tmp, buf); err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("writing spool segment: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("writing spool segment: %w", err)
	}
	if err := syncDir(s.dir); err != nil {
		return 0, fmt.Errorf("syncing spool dir: %w", err)
	}
	s.mu.Lock()
	s.segs = append(s.segs, spoolSeg{seq: seq, size: int64(len(buf))})
	s.bytes += int64(len(buf))
	s.mu.Unlock()
	return int64(len(buf)), nil
}

func writeFileSync(name string, b []byte) error {
	f, err := os.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// oldest returns the oldest segment.
func (s *spool) oldest() (spoolSeg, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.segs) == 0 {
		return spoolSeg{}, false
	}
	return s.segs[0], true
}

// read decodes a segment, checking its checksum.
func (s *spool) read(seg spoolSeg) ([]Record, error) {
	b, err := os.ReadFile(s.path(seg.seq))
	if err != nil {
		return nil, fmt.Errorf("reading spool segment %d: %w", seg.seq, err)
	}
	if len(b) < spoolHeader || string(b[:len(spoolMagic)]) != spoolMagic {
		return nil, fmt.Errorf("spool segment %d: bad header: %w", seg.seq, errSpoolCorrupt)
	}
	n := binary.BigEndian.Uint32(b[len(spoolMagic):])
	sum := binary.BigEndian.Uint32(b[len(spoolMagic)+4:])
	body := b[spoolHeader:]
	if uint32(len(body)) != n || crc32.Checksum(body, crcTable) != sum {
		return nil, fmt.Errorf("spool segment %d: checksum mismatch: %w", seg.seq, errSpoolCorrupt)
	}
	var recs []Record
	if err := json.Unmarshal(body, &recs); err != nil {
		return nil, fmt.Errorf("spool segment %d: %v: %w", seg.seq, err, errSpoolCorrupt)
	}
	return recs, nil
}

// remove deletes a replayed segment (the oldest).
func (s *spool) remove(seg spoolSeg) error {
	if err := os.Remove(s.path(seg.seq)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing spool segment %d: %w", seg.seq, err)
	}
	s.drop(seg)
	return nil
}

// setAside renames a segment out of the replay order (suffix .corrupt or
// .rejected), keeping it for an operator.
func (s *spool) setAside(seg spoolSeg, suffix string) error {
	p := s.path(seg.seq)
	err := os.Rename(p, p+suffix)
	s.drop(seg)
	return err
}

func (s *spool) drop(seg spoolSeg) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i := slices.IndexFunc(s.segs, func(x spoolSeg) bool { return x.seq == seg.seq }); i >= 0 {
		s.segs = slices.Delete(s.segs, i, i+1)
		s.bytes -= seg.size
	}
}

// size returns the bytes and segments waiting.
func (s *spool) size() (int64, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bytes, len(s.segs)
}

// close releases the directory lock.
func (s *spool) close() {
	if s.lock != nil {
		syscall.Flock(int(s.lock.Fd()), syscall.LOCK_UN)
		s.lock.Close()
		s.lock = nil
	}
}
