// Code copied from ../check.go by hand; TestCompatCheckerIsACopy in package
// envoy fails when the two differ below the package clause.

package main

// This file depends on protobuf and YAML only, never on go-control-plane,
// so that the nested module in compat/ (pinned to the oldest supported
// Envoy API) can carry a byte-for-byte copy of it (TestCompatCheckerIsACopy):
// every supported version is checked by the same code.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// yamlSource is a YAML document converted to JSON for protojson, with the
// YAML line of every key and list item, so that errors can name the line.
type yamlSource struct {
	json  []byte
	lines map[string]int // field path (a.b[0].c) -> YAML line
	paths map[int]string // YAML line -> the first field path on it
}

// decodeYAML decodes a YAML (or JSON) document into m as Envoy loads a
// bootstrap: unknown fields, unknown enum values, unresolvable "@type"s,
// repeated keys and YAML that is no JSON value are errors, each naming its
// line and field.
func decodeYAML(data []byte, m proto.Message) (*yamlSource, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("converting YAML to JSON: %w", err)
	}
	w := &jsonWriter{line: 1, src: &yamlSource{lines: map[string]int{}, paths: map[int]string{}}}
	if len(doc.Content) == 0 {
		return nil, errors.New("converting YAML to JSON: empty document")
	}
	if err := w.node(doc.Content[0], ""); err != nil {
		return nil, fmt.Errorf("converting YAML to JSON: %w", err)
	}
	w.src.json = w.buf.Bytes()
	if err := protojson.Unmarshal(w.src.json, m); err != nil {
		return w.src, w.src.explain(err)
	}
	return w.src, nil
}

// protojsonLine finds the "(line L:C)" protojson puts in its errors; the
// JSON that decodeYAML writes keeps every token on its YAML line.
var protojsonLine = regexp.MustCompile(`\(line (\d+):\d+\)`)

func (s *yamlSource) explain(err error) error {
	msg := err.Error()
	if sm := protojsonLine.FindStringSubmatch(msg); sm != nil {
		line, _ := strconv.Atoi(sm[1])
		if p, ok := s.pathAt(line); ok {
			return fmt.Errorf("line %d: %s: %w", line, p, err)
		}
		return fmt.Errorf("line %d: %w", line, err)
	}
	return err
}

// pathAt is the field path that starts on line, or the nearest one above
// it (a value written on the lines after its key).
func (s *yamlSource) pathAt(line int) (string, bool) {
	for l := line; l > 0; l-- {
		if p, ok := s.paths[l]; ok {
			return p, true
		}
	}
	return "", false
}

// lineOf is the YAML line of a field path as validate writes it: proto
// field names, [i] for list items, ["k"] for map keys and (Type) after an
// Any, whose fields are written inline beside its "@type". It falls back to
// the nearest enclosing field that has a line; 0 if none has.
func (s *yamlSource) lineOf(path string) int {
	if s == nil {
		return 0
	}
	p := anyTypeInPath.ReplaceAllString(path, "")
	p = mapKeyInPath.ReplaceAllStringFunc(p, func(k string) string {
		if u, err := strconv.Unquote(k[1 : len(k)-1]); err == nil {
			return "." + u
		}
		return k
	})
	for p != "" {
		if l, ok := s.lines[p]; ok {
			return l
		}
		i := strings.LastIndexAny(p, ".[")
		if i < 0 {
			break
		}
		p = p[:i]
	}
	return 0
}

var (
	anyTypeInPath = regexp.MustCompile(`\([A-Za-z0-9_.]+\)`)
	mapKeyInPath  = regexp.MustCompile(`\["(?:[^"\\]|\\.)*"\]`)
)

type jsonWriter struct {
	buf  bytes.Buffer
	line int
	src  *yamlSource
}

// to starts a new JSON line until the output is on YAML line l, so that
// protojson's line numbers are the YAML's.
func (w *jsonWriter) to(l int) {
	for w.line < l {
		w.buf.WriteByte('\n')
		w.line++
	}
}

func (w *jsonWriter) mark(path string, line int) {
	w.src.lines[path] = line
	if _, ok := w.src.paths[line]; !ok {
		w.src.paths[line] = path
	}
}

func (w *jsonWriter) node(n *yaml.Node, path string) error {
	switch n.Kind {
	case yaml.AliasNode:
		return w.node(n.Alias, path)
	case yaml.MappingNode:
		w.to(n.Line)
		w.buf.WriteByte('{')
		seen := map[string]int{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Kind != yaml.ScalarNode || k.Tag == "!!merge" {
				return fmt.Errorf("line %d: a key must be a plain string", k.Line)
			}
			if first, ok := seen[k.Value]; ok {
				return fmt.Errorf("line %d: key %q repeated (first on line %d)", k.Line, k.Value, first)
			}
			seen[k.Value] = k.Line
			if i > 0 {
				w.buf.WriteByte(',')
			}
			w.to(k.Line)
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			w.mark(p, k.Line)
			key, _ := json.Marshal(k.Value)
			w.buf.Write(key)
			w.buf.WriteByte(':')
			if err := w.node(v, p); err != nil {
				return err
			}
		}
		w.buf.WriteByte('}')
	case yaml.SequenceNode:
		w.to(n.Line)
		w.buf.WriteByte('[')
		for i, item := range n.Content {
			if i > 0 {
				w.buf.WriteByte(',')
			}
			p := fmt.Sprintf("%s[%d]", path, i)
			w.mark(p, item.Line)
			if err := w.node(item, p); err != nil {
				return err
			}
		}
		w.buf.WriteByte(']')
	case yaml.ScalarNode:
		w.to(n.Line)
		var v any
		if err := n.Decode(&v); err != nil {
			return fmt.Errorf("line %d: %w", n.Line, err)
		}
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("line %d: %s is no JSON value: %w", n.Line, n.Value, err)
		}
		w.buf.Write(b)
	default:
		return fmt.Errorf("line %d: unexpected YAML node", n.Line)
	}
	return nil
}

// validate runs the protoc-gen-validate rules (ValidateAll) of m and of the
// message inside every Any reachable from m (the generated validators stop
// at an Any), and returns every violation with its field path and, when src
// is set, its line.
func validate(m proto.Message, src *yamlSource) error {
	var vs []violation
	validateTree(m.ProtoReflect(), "", &vs)
	errs := make([]error, 0, len(vs))
	for _, v := range vs {
		if l := src.lineOf(v.path); l > 0 {
			errs = append(errs, fmt.Errorf("line %d: %s: %w", l, v.path, v.err))
		} else {
			errs = append(errs, fmt.Errorf("%s: %w", v.path, v.err))
		}
	}
	return errors.Join(errs...)
}

type violation struct {
	path string
	err  error
}

type allValidator interface{ ValidateAll() error }

// pgvError is what protoc-gen-validate's generated errors have in common.
type pgvError interface {
	Field() string
	Cause() error
}

func validateTree(m protoreflect.Message, path string, out *[]violation) {
	if v, ok := m.Interface().(allValidator); ok {
		if err := v.ValidateAll(); err != nil {
			locate(m.Descriptor(), path, err, out)
		}
	}
	searchAnys(m, path, out)
}

// locate turns a ValidateAll error into one violation per rule broken, each
// at the path of the field that broke it (the generated errors name fields
// in CamelCase, with [index] or [key]).
func locate(md protoreflect.MessageDescriptor, path string, err error, out *[]violation) {
	if multi, ok := err.(interface{ AllErrors() []error }); ok {
		for _, e := range multi.AllErrors() {
			locate(md, path, e, out)
		}
		return
	}
	pe, ok := err.(pgvError)
	if !ok || md == nil {
		*out = append(*out, violation{pathOrRoot(path, md), err})
		return
	}
	name, index, _ := strings.Cut(pe.Field(), "[")
	fd := fieldByCamel(md, name)
	if fd == nil {
		*out = append(*out, violation{pathOrRoot(path, md), err})
		return
	}
	p := joinPath(path, string(fd.Name()))
	if index != "" {
		index = strings.TrimSuffix(index, "]")
		if _, err := strconv.Atoi(index); err == nil {
			p += "[" + index + "]"
		} else {
			p += "[" + strconv.Quote(index) + "]"
		}
	}
	var inner protoreflect.MessageDescriptor
	switch {
	case fd.IsMap() && fd.MapValue().Message() != nil:
		inner = fd.MapValue().Message()
	case fd.Message() != nil:
		inner = fd.Message()
	}
	if c := pe.Cause(); c != nil {
		if _, nested := c.(pgvError); nested || isMulti(c) {
			locate(inner, p, c, out)
			return
		}
	}
	*out = append(*out, violation{p, err})
}

func isMulti(err error) bool {
	_, ok := err.(interface{ AllErrors() []error })
	return ok
}

func pathOrRoot(path string, md protoreflect.MessageDescriptor) string {
	if path == "" && md != nil {
		return string(md.FullName())
	}
	return path
}

// fieldByCamel finds the field that protoc-gen-validate calls name.
func fieldByCamel(md protoreflect.MessageDescriptor, name string) protoreflect.FieldDescriptor {
	fields := md.Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if strings.EqualFold(strings.ReplaceAll(string(fd.Name()), "_", ""), name) {
			return fd
		}
	}
	oneofs := md.Oneofs()
	for i := 0; i < oneofs.Len(); i++ {
		od := oneofs.Get(i)
		if strings.EqualFold(strings.ReplaceAll(string(od.Name()), "_", ""), name) && od.Fields().Len() > 0 {
			return od.Fields().Get(0)
		}
	}
	return nil
}

// walkMessage descends into a nested message: an Any is unpacked and
// validated as a root of its own; anything else is only searched for Anys,
// because its parent's ValidateAll has covered its own rules.
func walkMessage(m protoreflect.Message, path string, out *[]violation) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			*out = append(*out, violation{path, fmt.Errorf("unpacking %s: %w", a.GetTypeUrl(), err)})
			return
		}
		validateTree(inner.ProtoReflect(), path+"("+string(inner.ProtoReflect().Descriptor().FullName())+")", out)
		return
	}
	searchAnys(m, path, out)
}

func searchAnys(m protoreflect.Message, path string, out *[]violation) {
	type field struct {
		fd protoreflect.FieldDescriptor
		v  protoreflect.Value
	}
	var fields []field
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		fields = append(fields, field{fd, v})
		return true
	})
	// Field number order, so that violations come in a stable order.
	sort.Slice(fields, func(i, j int) bool { return fields[i].fd.Number() < fields[j].fd.Number() })
	for _, f := range fields {
		fd, v := f.fd, f.v
		name := joinPath(path, string(fd.Name()))
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				walkMessage(l.Get(i).Message(), fmt.Sprintf("%s[%d]", name, i), out)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			var keys []protoreflect.MapKey
			v.Map().Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
				keys = append(keys, k)
				return true
			})
			sort.Slice(keys, func(i, j int) bool { return keys[i].String() < keys[j].String() })
			for _, k := range keys {
				walkMessage(v.Map().Get(k).Message(), fmt.Sprintf("%s[%q]", name, k.String()), out)
			}
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			walkMessage(v.Message(), name, out)
		}
	}
}

func joinPath(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}
