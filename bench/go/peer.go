// peer.go — the Go peer of bench/lib_bench.c: a keyed rate limiter written the way Go users
// write one with golang.org/x/time/rate, measured on the same scenarios, key strings, random
// sequence and limits, printing the same RESULT lines with the name prefix "go_".
//
// The keyed limiter is the common idiom: map[string]*rate.Limiter under a sync.RWMutex —
// RLock for the lookup; on a miss Lock, look again, insert rate.NewLimiter(1e6, 1e6); then
// lim.Allow(). x/time/rate has no sliding window, so the sliding_window scenarios use the
// same map and locking around a small weighted two-window counter (the shape of the popular
// Go sliding-window packages: a mutex, the current and previous window counts, time.Now()),
// with the same limit (1,000,000 per 1 s) as libsluice's.
//
// Goroutines = threads and GOMAXPROCS = threads for each scenario. The key sequence is the
// same splitmix64 sequence as lib_bench (same --seed, --keys, --stream): key strings
// "bench:api:user:<n>" are generated before timing into one string and sliced (no allocation
// or cache miss of the harness's own per decision). Every 16th call is timed (runtime
// nanotime) for p50/p99. Results are checked like lib_bench's. cpu_share is the process's CPU
// time (GC included) / (wall time x threads): well under 1 means another process took the CPU.
//
// Build (no network, no modules):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=<build>/gocache go build -o <build>/sluice_go_peer bench/go/peer.go
package main

import (
	"flag"
	"fmt"
	"math"
	"math/bits"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	_ "unsafe" // go:linkname

	"golang.org/x/time/rate"
)

//go:linkname nanotime runtime.nanotime
func nanotime() int64

const (
	limit       = 1e6 // token bucket: rate and burst; sliding window: per window
	window      = int64(time.Second)
	sampleEvery = 16
	hotClient   = "user:0"
)

// ---- the keyed limiter, as Go users write it -----------------------------------------------

type allower interface{ Allow() bool }

type keyed[L allower] struct {
	mu   sync.RWMutex
	m    map[string]L
	newL func() L
}

func newKeyed[L allower](newL func() L) *keyed[L] {
	return &keyed[L]{m: make(map[string]L), newL: newL}
}

func (k *keyed[L]) get(key string) L {
	k.mu.RLock()
	l, ok := k.m[key]
	k.mu.RUnlock()
	if ok {
		return l
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if l, ok = k.m[key]; !ok {
		l = k.newL()
		k.m[key] = l
	}
	return l
}

func (k *keyed[L]) Allow(key string) bool { return k.get(key).Allow() }

func (k *keyed[L]) Len() int {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return len(k.m)
}

// Weighted two-window counter: never more than `limit` in an aligned window.
type slidingWindow struct {
	mu       sync.Mutex
	limit    int64
	window   int64
	curStart int64
	cur      int64
	prev     int64
}

func (s *slidingWindow) Allow() bool {
	now := time.Now().UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	start := now - now%s.window
	if start != s.curStart {
		if start-s.curStart == s.window {
			s.prev = s.cur
		} else {
			s.prev = 0
		}
		s.cur = 0
		s.curStart = start
	}
	weight := float64(s.window-(now-start)) / float64(s.window)
	if float64(s.prev)*weight+float64(s.cur)+1 > float64(s.limit) {
		return false
	}
	s.cur++
	return true
}

type limiter interface {
	Allow(key string) bool
	Len() int
}

// ---- parameters and helpers ----------------------------------------------------------------

var (
	fKeys       = flag.Uint64("keys", 1000000, "key population")
	fSeconds    = flag.Float64("seconds", 1.0, "target seconds per scenario repetition")
	fReps       = flag.Int("reps", 3, "repetitions per scenario (median reported)")
	fSeed       = flag.Uint64("seed", 0x5eed5eed, "random sequence seed")
	fStream     = flag.Uint64("stream", 1<<22, "length of the pre-generated key sequence")
	fThreadsMax = flag.Int("threads-max", 2, "1..N threads")
	fOps        = flag.Uint64("ops", 0, "fixed decisions per thread (0 = from a pilot run)")
	fPilot      = flag.Uint64("pilot", 50000, "decisions per thread in the pilot")
	fOnly       = flag.String("only", "", "run only scenarios whose name contains this")
	fQuick      = flag.Bool("quick", false, "tiny run (smoke test)")
	fBatch      = flag.Int("batch", 32, "accepted for symmetry with lib_bench (Go has no batch form)")
)

func die(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "go_peer: FAILED: "+format+"\n", a...)
	os.Exit(1)
}

func splitmix64(s *uint64) uint64 {
	*s += 0x9e3779b97f4a7c15
	z := *s
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func below(r, n uint64) uint64 { hi, _ := bits.Mul64(r, n); return hi }

func rssBytes() uint64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		die("cannot read /proc/self/statm: %v", err)
	}
	f := strings.Fields(string(b))
	res, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		die("cannot parse /proc/self/statm")
	}
	return res * uint64(os.Getpagesize())
}

func result(name, metric string, v float64) {
	prec := 1
	switch metric {
	case "ratio", "allowed_fraction", "cpu_share":
		prec = 4
	case "decisions_per_s", "keys", "bytes":
		prec = 0
	}
	fmt.Printf("RESULT name=%s metric=%s value=%.*f\n", name, metric, prec, v)
}

// CPU time of the whole process (the measured goroutines, and the GC's).
func cpuNs() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		die("getrusage: %v", err)
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// ---- keys ------------------------------------------------------------------------------------

const prefix = "bench:api:"

var (
	streamAll string   // all keys of the sequence, back to back
	streamOff []uint32 // key i is streamAll[streamOff[i]:streamOff[i+1]]
	hotKey    = prefix + hotClient
)

func makeStream() {
	var sb strings.Builder
	sb.Grow(int(*fStream) * 22)
	streamOff = make([]uint32, *fStream+1)
	s := *fSeed
	for i := uint64(0); i < *fStream; i++ {
		streamOff[i] = uint32(sb.Len())
		sb.WriteString(prefix)
		sb.WriteString("user:")
		sb.WriteString(strconv.FormatUint(below(splitmix64(&s), *fKeys), 10))
	}
	streamOff[*fStream] = uint32(sb.Len())
	streamAll = sb.String()
}

// ---- limiters ---------------------------------------------------------------------------------

type algo struct {
	name        string
	lim         limiter
	bytesPerKey float64
	heapPerKey  float64
}

func populate(a *algo, mk func() limiter) {
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	rss0 := rssBytes()
	a.lim = mk()
	t0 := time.Now()
	for n := uint64(0); n < *fKeys; n++ {
		// the key string is built here, as a server builds it from a request, and kept by the map
		key := prefix + "user:" + strconv.FormatUint(n, 10)
		if !a.lim.Allow(key) {
			die("warm-up %s %s denied", a.name, key)
		}
	}
	el := time.Since(t0)
	rss1 := rssBytes()
	runtime.GC()
	var ms1 runtime.MemStats
	runtime.ReadMemStats(&ms1)
	if uint64(a.lim.Len()) != *fKeys {
		die("%s: map holds %d keys after touching %d", a.name, a.lim.Len(), *fKeys)
	}
	var d uint64
	if rss1 > rss0 {
		d = rss1 - rss0
	}
	a.bytesPerKey = float64(d) / float64(*fKeys)
	a.heapPerKey = (float64(ms1.HeapAlloc) - float64(ms0.HeapAlloc)) / float64(*fKeys)
	name := "go_" + a.name + "_populate"
	result(name, "keys", float64(a.lim.Len()))
	result(name, "bytes", float64(d))
	result(name, "bytes_per_key", a.bytesPerKey)
	result(name, "heap_bytes_per_key", a.heapPerKey)
	result(name, "ns_per_insert", float64(el.Nanoseconds())/float64(*fKeys))
}

// ---- scenarios --------------------------------------------------------------------------------

type scenario struct {
	name    string
	a       *algo
	hot     bool
	threads int
	ops     uint64
	dps     []float64
	nspd    []float64
	p50     []float64
	p99     []float64
	allowed []float64
	cpu     []float64
}

type outcome struct {
	wallS, dps, nspd, p50, p99, allowedFraction float64
	cpuShare                                    float64 // process CPU time / (wall x threads)
	total, allowed                              uint64
}

func runWorker(sc *scenario, start uint64, ops uint64, samples []int64, allowedOut *uint64) []int64 {
	lim := sc.a.lim
	pos := start
	n := *fStream
	var allowed uint64
	for i := uint64(0); i < ops; i++ {
		var key string
		if sc.hot {
			key = hotKey
		} else {
			key = streamAll[streamOff[pos]:streamOff[pos+1]]
		}
		pos++
		if pos == n {
			pos = 0
		}
		var ok bool
		if i%sampleEvery == 0 {
			t0 := nanotime()
			ok = lim.Allow(key)
			samples = append(samples, nanotime()-t0)
		} else {
			ok = lim.Allow(key)
		}
		if ok {
			allowed++
		}
	}
	*allowedOut = allowed
	return samples
}

func runScenario(sc *scenario, ops uint64, check bool) outcome {
	runtime.GOMAXPROCS(sc.threads)
	var wg, ready sync.WaitGroup
	startCh := make(chan struct{})
	samples := make([][]int64, sc.threads)
	allowed := make([]uint64, sc.threads)
	for t := 0; t < sc.threads; t++ {
		wg.Add(1)
		ready.Add(1)
		go func(t int) {
			defer wg.Done()
			buf := make([]int64, 0, ops/sampleEvery+2)
			start := (*fStream / uint64(sc.threads)) * uint64(t)
			ready.Done()
			<-startCh
			samples[t] = runWorker(sc, start, ops, buf, &allowed[t])
		}(t)
	}
	ready.Wait()
	c0 := cpuNs()
	t0 := nanotime()
	close(startCh)
	wg.Wait()
	t1 := nanotime()
	c1 := cpuNs()

	var o outcome
	var all []int64
	for t := 0; t < sc.threads; t++ {
		o.total += ops
		o.allowed += allowed[t]
		all = append(all, samples[t]...)
	}
	if len(all) == 0 {
		die("%s: no latency samples", sc.name)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	o.p50 = float64(all[len(all)/2])
	o.p99 = float64(all[int(float64(len(all)-1)*0.99)])
	o.wallS = float64(t1-t0) / 1e9
	o.dps = float64(o.total) / o.wallS
	o.nspd = float64(t1-t0) * float64(sc.threads) / float64(o.total)
	o.allowedFraction = float64(o.allowed) / float64(o.total)
	o.cpuShare = float64(c1-c0) / (float64(t1-t0) * float64(sc.threads))
	runtime.GOMAXPROCS(*fThreadsMax)

	if check {
		if !sc.hot {
			if o.allowedFraction < 0.999 {
				die("%s: only %.4f of decisions on random keys allowed (expected ~1)", sc.name, o.allowedFraction)
			}
		} else {
			T := o.wallS + 0.002
			var hi, lo float64
			if strings.HasPrefix(sc.a.name, "token_bucket") {
				hi = limit + limit*T + 1
				lo = 0.25 * limit * o.wallS
			} else {
				// only a window wholly inside the run is sure to admit about L (see lib_bench.c)
				w := float64(window) / 1e9
				hi = limit * (math.Floor(T/w) + 2)
				lo = math.Max(0, 0.5*limit*math.Floor(o.wallS/w-1))
			}
			lo = math.Min(lo, float64(o.total))
			if float64(o.allowed) > hi {
				die("%s: %d allowed in %.3f s, above the limit's bound %.0f", sc.name, o.allowed, o.wallS, hi)
			}
			if float64(o.allowed) < lo {
				die("%s: only %d allowed in %.3f s (expected >= %.0f)", sc.name, o.allowed, o.wallS, lo)
			}
		}
	}
	return o
}

func opsFor(sc *scenario) uint64 {
	if *fOps != 0 {
		return *fOps
	}
	o := runScenario(sc, *fPilot, false)
	want := float64(*fPilot) / o.wallS * *fSeconds
	if want < float64(*fPilot) {
		return *fPilot
	}
	if want > 2e9 {
		want = 2e9
	}
	return uint64(want)
}

func main() {
	flag.Parse()
	if *fQuick {
		*fKeys = 10000
		*fSeconds = 0.003
		*fReps = 1
		*fStream = 1 << 16
		*fPilot = 2000
	}
	if *fKeys < 1 || *fReps < 1 || *fSeconds <= 0 || *fStream < 1024 || *fThreadsMax < 1 {
		die("parameters out of range")
	}
	runtime.GOMAXPROCS(*fThreadsMax)
	quick := ""
	if *fQuick {
		quick = " (quick)"
	}
	fmt.Printf("# go_peer %s golang.org/x/time/rate, %s, keys=%d seconds=%.3f reps=%d seed=%d stream=%d threads<=%d%s\n",
		runtime.Version(), time.Now().UTC().Format(time.RFC3339), *fKeys, *fSeconds, *fReps, *fSeed, *fStream, *fThreadsMax, quick)

	makeStream()
	algos := []*algo{{name: "token_bucket"}, {name: "sliding_window"}}
	populate(algos[0], func() limiter {
		return newKeyed(func() *rate.Limiter { return rate.NewLimiter(limit, limit) })
	})
	populate(algos[1], func() limiter {
		return newKeyed(func() *slidingWindow { return &slidingWindow{limit: limit, window: window} })
	})

	var scs []*scenario
	for _, a := range algos {
		for _, hot := range []bool{true, false} {
			for th := 1; th <= *fThreadsMax; th++ {
				k := "random"
				if hot {
					k = "hot"
				}
				name := fmt.Sprintf("go_%s_%s_%dt", a.name, k, th)
				if *fOnly != "" && !strings.Contains(name, *fOnly) {
					continue
				}
				scs = append(scs, &scenario{name: name, a: a, hot: hot, threads: th})
			}
		}
	}
	for _, sc := range scs {
		sc.ops = opsFor(sc)
	}
	for r := 0; r < *fReps; r++ {
		for _, sc := range scs {
			o := runScenario(sc, sc.ops, true)
			sc.dps = append(sc.dps, o.dps)
			sc.nspd = append(sc.nspd, o.nspd)
			sc.p50 = append(sc.p50, o.p50)
			sc.p99 = append(sc.p99, o.p99)
			sc.allowed = append(sc.allowed, o.allowedFraction)
			sc.cpu = append(sc.cpu, o.cpuShare)
			fmt.Fprintf(os.Stderr, "# rep %d %-40s %12.0f decisions/s  %7.1f ns/decision/thread  p50 %6.1f  p99 %7.1f ns  allowed %.4f  cpu %.2f\n",
				r+1, sc.name, o.dps, o.nspd, o.p50, o.p99, o.allowedFraction, o.cpuShare)
		}
	}
	for _, a := range algos {
		result("go_"+a.name+"_end", "keys", float64(a.lim.Len()))
	}
	for _, sc := range scs {
		result(sc.name, "decisions_per_s", median(sc.dps))
		result(sc.name, "ns_per_decision", median(sc.nspd))
		result(sc.name, "p50_ns", median(sc.p50))
		result(sc.name, "p99_ns", median(sc.p99))
		result(sc.name, "allowed_fraction", median(sc.allowed))
		result(sc.name, "cpu_share", median(sc.cpu))
		result(sc.name, "ops_per_thread", float64(sc.ops))
		result(sc.name, "bytes_per_key", sc.a.bytesPerKey)
		result(sc.name, "heap_bytes_per_key", sc.a.heapPerKey)
	}
}
