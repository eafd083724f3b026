package envoy

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// The names Envoy registers for its extensions, from the reference that was
// read from Envoy's source (shared/reference/envoy-extension-names.md), kept
// as a table in testdata so the check runs without the reference;
// TestExtensionNameTable fails when the two disagree. There is no Envoy
// binary here, so checking every name against this table is the nearest
// thing to `envoy --mode validate`.

var updateExtensionNames = flag.Bool("update-extension-names", false, "rewrite testdata/extension-names.tsv from the reference")

const extensionNamesFile = "testdata/extension-names.tsv"

// sourceNamesFile holds the few registered names the reference does not
// list, each read from Envoy's source (the row says where).
const sourceNamesFile = "testdata/extension-names-source.tsv"

// extRow is one row of the table: kind, name, config type ("-": none) and
// a note.
type extRow struct{ kind, name, typ, note string }

// Kinds of row.
const (
	kindExtension   = "extension"        // resolved by typed_config type; name is the registered one
	kindContrib     = "contrib"          // exists only in contrib images
	kindCluster     = "cluster"          // cluster factory: cluster_type.name
	kindProtocolKey = "protocol_options" // typed_extension_protocol_options key
	kindAction      = "overload_action"  // overload_manager.actions[].name
	kindMonitor     = "resource_monitor" // overload_manager.resource_monitors[].name
)

// parseReference reads the tables of envoy-extension-names.md.
func parseReference(md []byte) ([]extRow, error) {
	var rows []extRow
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(md))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "## ") || strings.HasPrefix(line, "### ") {
			section = strings.Fields(line)[1]
			continue
		}
		if !strings.HasPrefix(line, "| ") || strings.HasPrefix(line, "|---") {
			continue
		}
		cols := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cols {
			cols[i] = strings.Trim(strings.TrimSpace(cols[i]), "`")
		}
		first := cols[0]
		if !strings.HasPrefix(first, "envoy.") {
			continue // headers, prose rows
		}
		switch {
		case section == "1.4" && len(cols) >= 4:
			if strings.Contains(cols[1], "deprecated alias") {
				rows = append(rows, extRow{kindProtocolKey + "_alias", first, "-", "parses, but Envoy reads the options only under the canonical key"})
				continue
			}
			rows = append(rows, extRow{kindProtocolKey, first, firstType(cols[2]), ""})
		case section == "2." && len(cols) >= 4:
			rows = append(rows, extRow{kindCluster, first, firstType(cols[3]), ""})
		case section == "3.1":
			rows = append(rows, extRow{kindAction, first, "-", ""})
		case section == "3.3" && len(cols) >= 3:
			rows = append(rows, extRow{kindMonitor, first, firstType(cols[2]), ""})
		case (section == "4." || section == "4.1") && len(cols) >= 6:
			kind := kindExtension
			if section == "4.1" {
				kind = kindContrib
			}
			name, typ := first, ""
			reg := cols[5]
			if after, ok := strings.CutPrefix(reg, "REGISTERED AS "); ok {
				name = strings.FieldsFunc(after, func(r rune) bool { return r == ' ' || r == ';' || r == '(' })[0]
			}
			if i := strings.Index(reg, "type envoy."); i >= 0 {
				typ = strings.FieldsFunc(reg[i+len("type "):], func(r rune) bool { return r == ' ' || r == ';' || r == ')' })[0]
			}
			types := []string{}
			if typ != "" {
				types = append(types, typ)
			}
			for _, t := range strings.Split(cols[4], ",") {
				if t = strings.TrimSpace(t); t != "" && !strings.HasPrefix(t, "(") {
					types = append(types, t)
				}
			}
			if len(types) == 0 {
				types = []string{"-"}
			}
			for _, t := range types {
				rows = append(rows, extRow{kind, name, t, ""})
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(rows) == 0 {
		return nil, errors.New("no tables found")
	}
	sort.Slice(rows, func(i, j int) bool {
		a, b := rows[i], rows[j]
		return a.kind+"\x00"+a.name+"\x00"+a.typ < b.kind+"\x00"+b.name+"\x00"+b.typ
	})
	return slices.Compact(rows), nil
}

// firstType is the config type a table cell names, "-" for none.
func firstType(cell string) string {
	for _, f := range strings.FieldsFunc(cell, func(r rune) bool { return r == ' ' || r == ',' || r == '(' || r == ')' || r == ';' }) {
		if strings.HasPrefix(f, "envoy.") && strings.Count(f, ".") >= 3 && f[strings.LastIndex(f, ".")+1] >= 'A' && f[strings.LastIndex(f, ".")+1] <= 'Z' {
			return f
		}
	}
	return "-"
}

func formatTable(rows []extRow) []byte {
	var b bytes.Buffer
	b.WriteString("# Derived from shared/reference/envoy-extension-names.md by TestExtensionNameTable\n")
	b.WriteString("# (go test ./envoy -run TestExtensionNameTable -update-extension-names). kind\tname\ttype\tnote\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "%s\t%s\t%s\t%s\n", r.kind, r.name, r.typ, r.note)
	}
	return b.Bytes()
}

func readTable(t *testing.T) []extRow { return readRows(t, extensionNamesFile) }

// readAllTables is the reference's table and the rows read from Envoy's
// source.
func readAllTables(t *testing.T) []extRow {
	return append(readTable(t), readRows(t, sourceNamesFile)...)
}

func readRows(t *testing.T, file string) []extRow {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var rows []extRow
	for i, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) != 4 {
			t.Fatalf("%s:%d: want 4 tab-separated columns", file, i+1)
		}
		rows = append(rows, extRow{f[0], f[1], f[2], f[3]})
	}
	return rows
}

// findReference looks for shared/reference/ beside the checkout (where the
// workplace and CI put it) or in MESHGUARD_REFERENCE_DIR.
func findReference() string {
	if d := os.Getenv("MESHGUARD_REFERENCE_DIR"); d != "" {
		return filepath.Join(d, "envoy-extension-names.md")
	}
	dir, _ := filepath.Abs(".")
	for range 6 {
		p := filepath.Join(dir, "shared", "reference", "envoy-extension-names.md")
		if _, err := os.Stat(p); err == nil {
			return p
		}
		dir = filepath.Dir(dir)
	}
	return ""
}

// TestExtensionNameTable: testdata/extension-names.tsv is what the reference
// says, word for word, and holds the rows the checks below rely on.
func TestExtensionNameTable(t *testing.T) {
	ref := findReference()
	switch {
	case ref == "" && os.Getenv("CI") == "true":
		t.Fatal("shared/reference/envoy-extension-names.md not found beside the checkout (set MESHGUARD_REFERENCE_DIR)")
	case ref != "":
		md, err := os.ReadFile(ref)
		if err != nil {
			t.Fatal(err)
		}
		rows, err := parseReference(md)
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		want := formatTable(rows)
		if *updateExtensionNames {
			if err := os.WriteFile(extensionNamesFile, want, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if got, _ := os.ReadFile(extensionNamesFile); !bytes.Equal(got, want) {
			t.Errorf("%s is not what %s says; rerun with -update-extension-names and review the diff", extensionNamesFile, ref)
		}
	default:
		t.Log("reference not found; checking the committed table only")
	}
	// The rows read from Envoy's source add to the reference, never
	// restate or contradict it.
	refReg := newRegistry(readTable(t))
	for _, r := range readRows(t, sourceNamesFile) {
		if r.kind != kindExtension || r.typ == "-" || r.note == "" {
			t.Errorf("%s: row %v: want an extension with its config type and where in Envoy's source it was read", sourceNamesFile, r)
		}
		if n, ok := refReg.extName[r.typ]; ok {
			t.Errorf("%s: the reference lists %s (as %q) now: delete the row", sourceNamesFile, r.typ, n)
		}
	}
	// Facts the reference states that the checks depend on.
	reg := newRegistry(readTable(t))
	for _, c := range []struct{ got, want string }{
		{reg.clusterName["envoy.extensions.clusters.dns.v3.DnsCluster"], "envoy.cluster.dns"},
		{reg.extName["envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"], "envoy.filters.http.ext_authz"},
		{reg.extName["envoy.config.trace.v3.OpenTelemetryConfig"], "envoy.tracers.opentelemetry"},
		{reg.extName["envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"], "envoy.retry_host_predicates.previous_hosts"},
	} {
		if c.got != c.want {
			t.Errorf("table gives %q, the reference says %q", c.got, c.want)
		}
	}
	if !reg.protocolKeys["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] || reg.protocolKeys["envoy.upstreams.http.http_protocol_options"] {
		t.Error("typed_extension_protocol_options keys: want the canonical key only")
	}
	if !reg.actions["envoy.overload_actions.shrink_heap"] || len(reg.actions) != 8 {
		t.Errorf("overload actions: %v, the reference lists 8", reg.actions)
	}
}

// registry indexes the table.
type registry struct {
	extName      map[string]string // config type -> registered name (core)
	contrib      map[string]string // config type -> contrib extension
	clusterName  map[string]string // config type -> cluster factory name
	clusters     map[string]string // cluster factory name -> config type ("-")
	protocolKeys map[string]bool
	actions      map[string]bool
	monitors     map[string]string // monitor name -> config type
}

func newRegistry(rows []extRow) *registry {
	r := &registry{extName: map[string]string{}, contrib: map[string]string{}, clusterName: map[string]string{},
		clusters: map[string]string{}, protocolKeys: map[string]bool{}, actions: map[string]bool{}, monitors: map[string]string{}}
	for _, row := range rows {
		switch row.kind {
		case kindExtension:
			if row.typ != "-" {
				r.extName[row.typ] = row.name
			}
		case kindContrib:
			if row.typ != "-" {
				r.contrib[row.typ] = row.name
			}
		case kindCluster:
			r.clusters[row.name] = row.typ
			if row.typ != "-" {
				r.clusterName[row.typ] = row.name
			}
		case kindProtocolKey:
			r.protocolKeys[row.name] = true
		case kindAction:
			r.actions[row.name] = true
		case kindMonitor:
			r.monitors[row.name] = row.typ
		}
	}
	return r
}

// checkNames returns every extension name in m that the Envoy of the
// reference would not resolve as written: a name beside a typed_config that
// is not the name registered for that type, a contrib-only extension, a
// cluster_type not registered under its name, a protocol-options key other
// than a canonical one, an unknown overload action or resource monitor, an
// overload trigger naming no monitor, and a typed_per_filter_config key that
// names no HTTP filter of the chain.
func (r *registry) checkNames(m proto.Message) []string {
	var bad []string
	monitors := map[string]bool{}
	eachMessage(m.ProtoReflect(), "", func(msg protoreflect.Message, path string) {
		if msg.Descriptor().FullName() == "envoy.config.overload.v3.ResourceMonitor" {
			monitors[stringField(msg, "name")] = true
		}
	})
	eachMessage(m.ProtoReflect(), "", func(msg protoreflect.Message, path string) {
		name := stringField(msg, "name")
		typ := anyType(msg, "typed_config")
		switch msg.Descriptor().FullName() {
		case "envoy.config.cluster.v3.Cluster.CustomClusterType":
			want, ok := r.clusters[name]
			switch {
			case !ok:
				bad = append(bad, fmt.Sprintf("%s: cluster_type.name %q is no registered cluster factory (registered for %s: %q)", path, name, typ, r.clusterName[typ]))
			case typ != "" && want != typ:
				bad = append(bad, fmt.Sprintf("%s: cluster factory %q takes %s, not %s", path, name, want, typ))
			}
			return
		case "envoy.config.cluster.v3.Cluster":
			fd := msg.Descriptor().Fields().ByName("typed_extension_protocol_options")
			msg.Get(fd).Map().Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
				if !r.protocolKeys[k.String()] {
					bad = append(bad, fmt.Sprintf("%s.typed_extension_protocol_options: key %q is not a canonical protocol-options name", path, k.String()))
				}
				return true
			})
		case "envoy.config.overload.v3.ResourceMonitor":
			if want, ok := r.monitors[name]; !ok || want != typ {
				bad = append(bad, fmt.Sprintf("%s: resource monitor %q with %s: the registered monitors are %v", path, name, typ, r.monitors))
			}
			return
		case "envoy.config.overload.v3.OverloadAction":
			if !r.actions[name] {
				bad = append(bad, fmt.Sprintf("%s: unknown overload action %q", path, name))
			}
		case "envoy.config.overload.v3.Trigger":
			if !monitors[name] {
				bad = append(bad, fmt.Sprintf("%s: trigger %q names no configured resource monitor", path, name))
			}
		case "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager":
			bad = append(bad, perFilterKeys(msg, path)...)
		}
		if typ == "" || msg.Descriptor().Fields().ByName("name") == nil {
			return
		}
		switch want, ok := r.extName[typ]; {
		case ok && name != want:
			bad = append(bad, fmt.Sprintf("%s: name %q, Envoy registers %s as %q", path, name, typ, want))
		case !ok && r.contrib[typ] != "":
			bad = append(bad, fmt.Sprintf("%s: %s (%s) exists only in Envoy's contrib images", path, r.contrib[typ], typ))
		case !ok:
			bad = append(bad, fmt.Sprintf("%s: %s is no extension type the reference lists", path, typ))
		}
	})
	return bad
}

// perFilterKeys checks that every typed_per_filter_config key in an HCM's
// routes names one of its HTTP filters (Envoy matches the key exactly).
func perFilterKeys(hcm protoreflect.Message, path string) []string {
	var filters []string
	var bad []string
	eachMessage(hcm, path, func(msg protoreflect.Message, p string) {
		if msg.Descriptor().FullName() == "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter" {
			filters = append(filters, stringField(msg, "name"))
		}
	})
	eachMessage(hcm, path, func(msg protoreflect.Message, p string) {
		fd := msg.Descriptor().Fields().ByName("typed_per_filter_config")
		if fd == nil || !fd.IsMap() {
			return
		}
		msg.Get(fd).Map().Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
			if !slices.Contains(filters, k.String()) {
				bad = append(bad, fmt.Sprintf("%s.typed_per_filter_config: key %q names no HTTP filter of the chain %v", p, k.String(), filters))
			}
			return true
		})
	})
	return bad
}

func stringField(m protoreflect.Message, name protoreflect.Name) string {
	fd := m.Descriptor().Fields().ByName(name)
	if fd == nil || fd.Kind() != protoreflect.StringKind || fd.IsList() {
		return ""
	}
	return m.Get(fd).String()
}

// anyType is the message type packed in m's Any field name, "" if unset.
func anyType(m protoreflect.Message, name protoreflect.Name) string {
	fd := m.Descriptor().Fields().ByName(name)
	if fd == nil || fd.Message() == nil || fd.Message().FullName() != "google.protobuf.Any" || !m.Has(fd) {
		return ""
	}
	u := m.Get(fd).Message().Interface().(*anypb.Any).GetTypeUrl()
	return u[strings.LastIndex(u, "/")+1:]
}

// eachMessage calls f on m and every message below it, unpacking Anys.
func eachMessage(m protoreflect.Message, path string, f func(protoreflect.Message, string)) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err == nil {
			eachMessage(inner.ProtoReflect(), path, f)
		}
		return
	}
	f(m, path)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := joinPath(path, string(fd.Name()))
		switch {
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < v.List().Len(); i++ {
				eachMessage(v.List().Get(i).Message(), fmt.Sprintf("%s[%d]", name, i), f)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				eachMessage(mv.Message(), fmt.Sprintf("%s[%q]", name, k.String()), f)
				return true
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			eachMessage(v.Message(), name, f)
		}
		return true
	})
}

// TestExtensionNames: every extension name in the shipped bootstraps is the
// one Envoy registers (see checkNames).
func TestExtensionNames(t *testing.T) {
	reg := newRegistry(readAllTables(t))
	files, _ := filepath.Glob("*.yaml")
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			b, err := ParseBootstrap(mustRead(t, f))
			if err != nil {
				t.Fatal(err)
			}
			for _, msg := range reg.checkNames(b) {
				t.Error(msg)
			}
		})
	}
}

// TestExtensionNamesRejects: each mistake the reference warns about fails.
func TestExtensionNamesRejects(t *testing.T) {
	reg := newRegistry(readAllTables(t))
	tests := []struct{ name, old, new, want string }{
		{"plural cluster factory name (R7)", "name: envoy.cluster.dns\n", "name: envoy.clusters.dns\n", `cluster_type.name "envoy.clusters.dns" is no registered cluster factory (registered for envoy.extensions.clusters.dns.v3.DnsCluster: "envoy.cluster.dns")`},
		{"alias protocol-options key (R10)", "      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n", "      envoy.upstreams.http.http_protocol_options:\n", `key "envoy.upstreams.http.http_protocol_options" is not a canonical`},
		{"filter name not the registered one", "- name: envoy.filters.http.router", "- name: router", `name "router", Envoy registers envoy.extensions.filters.http.router.v3.Router as "envoy.filters.http.router"`},
		{"deprecated alias of a logger", "- name: envoy.access_loggers.http_grpc", "- name: envoy.http_grpc_access_log", `Envoy registers envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig as "envoy.access_loggers.http_grpc"`},
		{"unknown overload action (R11)", "envoy.overload_actions.shrink_heap", "envoy.overload_actions.shrink", `unknown overload action "envoy.overload_actions.shrink"`},
		{"trigger naming no monitor", "    - name: envoy.resource_monitors.fixed_heap\n      threshold: {value: 0.90}", "    - name: fixed_heap\n      threshold: {value: 0.90}", `trigger "fixed_heap" names no configured resource monitor`},
		{"early header mutation under the HTTP filter's name", "- name: envoy.http.early_header_mutation.header_mutation\n", "- name: envoy.filters.http.header_mutation\n", `Envoy registers envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation as "envoy.http.early_header_mutation.header_mutation"`},
		{"per-route config under another name (R4)", "                  envoy.filters.http.ext_authz:\n", "                  ext_authz:\n", `key "ext_authz" names no HTTP filter`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !bytes.Contains(FrontProxy, []byte(tc.old)) {
				t.Fatalf("envoy.yaml has no %q", tc.old)
			}
			b, err := ParseBootstrap(bytes.Replace(FrontProxy, []byte(tc.old), []byte(tc.new), 1))
			if err != nil {
				t.Fatal(err)
			}
			got := reg.checkNames(b)
			if !slices.ContainsFunc(got, func(s string) bool { return strings.Contains(s, tc.want) }) {
				t.Errorf("checkNames = %q, want one containing %q", got, tc.want)
			}
		})
	}
}
