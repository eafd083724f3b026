package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime"
	"sort"
	"strings"
)

// errUsage marks a command line that could not be understood; the message has
// already been printed with the usage text.
var errUsage = errors.New("usage error")

// command is one subcommand of meshguard.
type command struct {
	summary string
	run     func(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error
}

// commands lists every subcommand.
var commands = map[string]command{
	"serve":        {"run the gRPC and HTTP listeners", runServe},
	"check-config": {"validate a config file offline and list every error", runCheckConfig},
	"migrate":      {"apply the audit database schema", runMigrate},
	"audit":        {"export, verify or prune the audit trail", runAudit},
	"version":      {"print the version", runVersion},
}

// run is the whole program: main only turns signals into ctx cancellation and
// the returned error into an exit code.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) < 2 {
		usage(stderr)
		return errUsage
	}
	name := args[1]
	switch name {
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return nil
	case "-version", "--version":
		name = "version"
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "unknown command %q\n", name)
		usage(stderr)
		return errUsage
	}
	err := cmd.run(ctx, args[2:], getenv, stdout, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	return err
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: meshguard <command> [flags]\n\ncommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-13s %s\n", n, commands[n].summary)
	}
}

func runVersion(_ context.Context, _ []string, _ func(string) string, stdout, _ io.Writer) error {
	fmt.Fprintf(stdout, "meshguard %s %s %s/%s\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return nil
}

func runCheckConfig(_ context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("check-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	noEnv := fs.Bool("no-env", false, "ignore environment overrides")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: meshguard check-config [-no-env] FILE")
		return errUsage
	}
	if *noEnv {
		getenv = func(string) string { return "" }
	}
	cfg, err := loadConfig(fs.Arg(0), getenv)
	if err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			fmt.Fprintln(stderr, line)
		}
		return fmt.Errorf("%s: invalid configuration", fs.Arg(0))
	}
	for _, w := range configWarnings(cfg) {
		fmt.Fprintln(stderr, "warning: "+w)
	}
	fmt.Fprintf(stdout, "%s: ok\n", fs.Arg(0))
	return nil
}
