package k8s

import (
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/meshguard/meshguard/envoy"
)

// TestSafeRollouts: rollouts, scale-downs and node drains lose no request
// by construction, in every kustomization.
func TestSafeRollouts(t *testing.T) {
	for _, dir := range []string{"base", "overlays/production", "overlays/development"} {
		t.Run(dir, func(t *testing.T) {
			o := build(t, dir)
			// The HPA alone owns the replica count.
			for _, h := range o.hpas {
				if d := o.deployments[h.Spec.ScaleTargetRef.Name]; d != nil && d.Spec.Replicas != nil {
					t.Errorf("Deployment %s sets replicas %d beside HPA %s: every apply scales it back", d.Name, *d.Spec.Replicas, h.Name)
				}
			}
			for name, d := range o.deployments {
				if ru := d.Spec.Strategy.RollingUpdate; ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
					t.Errorf("Deployment %s: rolling update must keep maxUnavailable 0", name)
				}
			}
			// A pod that is not ready never blocks a node drain.
			for name, p := range o.pdbs {
				if p.Spec.UnhealthyPodEvictionPolicy == nil || *p.Spec.UnhealthyPodEvictionPolicy != policyv1.AlwaysAllow {
					t.Errorf("PDB %s: unhealthyPodEvictionPolicy %v, want AlwaysAllow", name, p.Spec.UnhealthyPodEvictionPolicy)
				}
			}
			checkEnvoyDrain(t, o)
			// No floating image tags; production runs images by digest.
			digest := regexp.MustCompile(`^[^@]+@sha256:[0-9a-f]{64}$`)
			for name, d := range o.deployments {
				for _, c := range append(slices.Clone(d.Spec.Template.Spec.Containers), d.Spec.Template.Spec.InitContainers...) {
					if strings.HasSuffix(c.Image, ":latest") || strings.HasSuffix(c.Image, "-latest") || !strings.Contains(c.Image, ":") {
						t.Errorf("Deployment %s container %s runs floating image %q", name, c.Name, c.Image)
					}
					if dir == "overlays/production" && !digest.MatchString(c.Image) {
						t.Errorf("production Deployment %s container %s: image %q is not pinned by digest", name, c.Name, c.Image)
					}
				}
			}
			for name, j := range o.jobs {
				for _, c := range j.Spec.Template.Spec.Containers {
					if dir == "overlays/production" && !digest.MatchString(c.Image) {
						t.Errorf("production Job %s container %s: image %q is not pinned by digest", name, c.Name, c.Image)
					}
				}
			}
			// Envoy's listener is reachable from the ingress controller only,
			// never from any source: a client that reached Envoy around the
			// load balancer could choose its X-Forwarded-For.
			np, ed := o.netpols["envoy"], o.deployments["envoy"]
			if np == nil || ed == nil {
				t.Fatal("no Envoy NetworkPolicy or Deployment")
			}
			http := containerPort(container(t, &ed.Spec.Template.Spec, "envoy"), "http")
			for i, rule := range np.Spec.Ingress {
				covers := len(rule.Ports) == 0 || slices.ContainsFunc(rule.Ports, func(p networkingv1.NetworkPolicyPort) bool { return policyPortCovers(p, *http) })
				if covers && len(rule.From) == 0 {
					t.Errorf("envoy NetworkPolicy ingress[%d] admits the listener port from anywhere", i)
				}
				for _, peer := range rule.From {
					if covers && peer.PodSelector == nil && peer.NamespaceSelector == nil && peer.IPBlock == nil {
						t.Errorf("envoy NetworkPolicy ingress[%d] has an empty peer", i)
					}
				}
			}
		})
	}
}

// checkEnvoyDrain: Envoy drains its listeners gracefully through the admin
// API on loopback before SIGTERM, the grace period covers the drain, and its
// worker count follows the pod's CPU limit.
func checkEnvoyDrain(t *testing.T, o *objects) {
	t.Helper()
	d := o.deployments["envoy"]
	ps := &d.Spec.Template.Spec
	c := container(t, ps, "envoy")
	b, err := envoy.ParseBootstrap(envoy.FrontProxy)
	if err != nil {
		t.Fatal(err)
	}
	admin := b.GetAdmin().GetAddress().GetSocketAddress()
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Exec == nil {
		t.Fatal("envoy: preStop must run a graceful drain")
	}
	script := strings.Join(c.Lifecycle.PreStop.Exec.Command, " ")
	for _, want := range []string{
		"/dev/tcp/" + admin.GetAddress() + "/" + strconv.Itoa(int(admin.GetPortValue())),
		"POST /drain_listeners?graceful",
	} {
		if !strings.Contains(script, want) {
			t.Errorf("envoy preStop %q does not contain %q (graceful drain through the loopback admin API)", script, want)
		}
	}
	m := regexp.MustCompile(`sleep (\d+)`).FindStringSubmatch(script)
	if m == nil {
		t.Fatalf("envoy preStop %q does not wait for the drain", script)
	}
	wait, _ := strconv.Atoi(m[1])
	drain, err := strconv.Atoi(argAfter(c.Args, "--drain-time-s"))
	if err != nil {
		t.Fatalf("--drain-time-s: %v", err)
	}
	if wait < drain {
		t.Errorf("envoy preStop waits %ds, less than --drain-time-s %d: SIGTERM would cut the drain", wait, drain)
	}
	if grace := ps.TerminationGracePeriodSeconds; grace == nil || time.Duration(*grace)*time.Second <= time.Duration(wait+5)*time.Second {
		t.Errorf("envoy terminationGracePeriodSeconds %v: want more than the preStop wait (%ds) plus 5s to exit", grace, wait)
	}
	// --concurrency $(ENVOY_CONCURRENCY), ENVOY_CONCURRENCY = limits.cpu.
	arg := argAfter(c.Args, "--concurrency")
	if !strings.HasPrefix(arg, "$(") || !strings.HasSuffix(arg, ")") {
		t.Fatalf("envoy --concurrency %q: want $(VAR) from the downward API", arg)
	}
	name := strings.TrimSuffix(strings.TrimPrefix(arg, "$("), ")")
	i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == name })
	if i < 0 || c.Env[i].ValueFrom == nil || c.Env[i].ValueFrom.ResourceFieldRef == nil || c.Env[i].ValueFrom.ResourceFieldRef.Resource != "limits.cpu" {
		t.Errorf("envoy env %s must come from resourceFieldRef limits.cpu", name)
	} else if div := c.Env[i].ValueFrom.ResourceFieldRef.Divisor; div.Cmp(resource.MustParse("1")) != 0 {
		t.Errorf("envoy env %s divisor %s, want 1 (whole CPUs)", name, div.String())
	}
	if c.Resources.Limits.Cpu().IsZero() {
		t.Error("envoy has no CPU limit to take --concurrency from")
	}
}
