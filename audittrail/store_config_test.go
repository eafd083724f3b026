package audittrail

import (
	"os"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

func decodeStoreConfig(t *testing.T, path string) Config {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cfg := DefaultConfig()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestStoreConfig(t *testing.T) {
	if err := DefaultConfig().validateStore(); err != nil {
		t.Fatalf("DefaultConfig: %v", err)
	}
	good := decodeStoreConfig(t, "testdata/store/good_store.yaml")
	if err := good.validateStore(); err != nil {
		t.Fatalf("good_store.yaml: %v", err)
	}
	if good.SpoolFullPolicy != SpoolFullDrop || good.BatchInterval != 100*time.Millisecond || good.ChainID != "pod-a" {
		t.Fatalf("good_store.yaml decoded to %+v", good)
	}

	err := decodeStoreConfig(t, "testdata/store/bad_store.yaml").validateStore()
	if err == nil {
		t.Fatal("bad_store.yaml validated")
	}
	for _, want := range []string{
		`audit.retention: must be at least 24h (partitions are monthly), got "1h0m0s"`,
		`audit.retention_interval: must not be negative, got "-1s"`,
		`audit.partitions_ahead: must be between 1 and 36, got 0`,
		`audit.spool_dir: must be set`,
		`audit.spool_max_bytes: must be at least 1048576 (1 MiB), got 1000`,
		`audit.spool_full_policy: must be block or drop, got "wait"`,
		`audit.batch_size: must be between 1 and 100000, got 0`,
		`audit.batch_interval: must be positive, got "0s"`,
		`audit.queue_size: must be at least audit.batch_size (0), got -1`,
		`audit.write_timeout: must be positive, got "0s"`,
		`audit.checkpoint_interval: must be positive, got "0s"`,
		`audit.chain_id: must be at most 200 printable bytes without spaces or '+', got "a b"`,
		`audit.trusted_keys[0]: not a public key (name+hash+base64), got "nope"`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q; got:\n%v", want, err)
		}
	}
}
