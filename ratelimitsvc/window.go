package ratelimitsvc

import (
	"context"
	"math"
	"time"
)

// store counts hits per counter. Implementations: memoryStore (in process)
// and RedisStore. evaluate looks at every counter of one request, decides
// whether the request is admitted (see admit) and, only if it is, adds each
// counter's hits, atomically where the store allows. It fills res with the
// counts seen before this request's hits. An error means "could not decide".
type store interface {
	evaluate(ctx context.Context, nowMs int64, reqs []counterReq, res []counterRes) (admitted bool, err error)
}

// counterReq is one descriptor's counter in one request.
type counterReq struct {
	id     []byte // identity of the counter (domain, entries, window); no bucket
	hash   uint64 // FNV-1a of id: Redis hash tag and local cache shard
	window int64  // milliseconds
	limit  uint64
	hits   int64 // 0: check only; negative: give quota back
	fixed  bool
	shadow bool // counted, never refuses
	quota  bool // refuses only when every quota counter is over
}

// counterRes is what the store saw before the request's hits.
type counterRes struct {
	cur, prev int64
}

// bucketOf returns the window bucket of nowMs, and the weight (parts per
// million) of the previous bucket in the sliding estimate; -1 for a fixed
// window, whose previous bucket does not count.
func bucketOf(r *counterReq, nowMs int64) (bucket, weightPPM int64) {
	bucket = nowMs / r.window
	if r.fixed {
		return bucket, -1
	}
	elapsed := nowMs - bucket*r.window
	return bucket, (r.window - elapsed) * 1_000_000 / r.window
}

// estimate is the approximated sliding-window count: the previous bucket
// weighted by how much of it the window still covers, plus the current one.
// The Redis script computes exactly the same expression.
func estimate(c counterRes, weightPPM int64) float64 {
	if weightPPM < 0 {
		return float64(c.cur)
	}
	return float64(c.prev)*float64(weightPPM)/1_000_000 + float64(c.cur)
}

func need(hits int64) int64 {
	if hits == 0 {
		return 1
	}
	return hits
}

// isOver reports whether the request's hits would take the counter past its
// limit. A check (hits 0) is over when not even one more hit fits. Negative
// hits are never over.
func isOver(r *counterReq, c counterRes, nowMs int64) bool {
	if r.hits < 0 {
		return false
	}
	_, w := bucketOf(r, nowMs)
	return estimate(c, w)+float64(need(r.hits)) > float64(r.limit)
}

// admit is the rule every store applies: a request is refused when a normal
// counter is over, or when it has quota counters and all of them are over.
// Shadow counters never refuse.
func admit(reqs []counterReq, res []counterRes, nowMs int64) bool {
	quotas, quotasOver := 0, 0
	for i := range reqs {
		r := &reqs[i]
		if r.shadow {
			continue
		}
		over := isOver(r, res[i], nowMs)
		if r.quota {
			quotas++
			if over {
				quotasOver++
			}
			continue
		}
		if over {
			return false
		}
	}
	return quotas == 0 || quotasOver < quotas
}

// remaining is the quota left after the request (whose hits count only if
// admitted).
func remaining(r *counterReq, c counterRes, admitted bool, nowMs int64) uint64 {
	_, w := bucketOf(r, nowMs)
	est := estimate(c, w)
	if admitted {
		est += float64(r.hits)
	}
	left := math.Floor(float64(r.limit) - est)
	if left <= 0 {
		return 0
	}
	return uint64(left)
}

// untilReset is the time until the current bucket ends.
func untilReset(r *counterReq, nowMs int64) time.Duration {
	bucket, _ := bucketOf(r, nowMs)
	return time.Duration((bucket+1)*r.window-nowMs) * time.Millisecond
}

// retryAfter is how long, with no further hits, until need(hits) hits fit
// again. For a sliding window the previous bucket's weight falls linearly to
// zero over the current bucket; at the bucket's end the current count
// becomes the previous one.
func retryAfter(r *counterReq, c counterRes, nowMs int64) time.Duration {
	bucket, w := bucketOf(r, nowMs)
	elapsed := nowMs - bucket*r.window
	toEnd := r.window - elapsed
	room := float64(r.limit) - float64(need(r.hits)) // the estimate must fall to this
	win := float64(r.window)
	var ms float64
	switch {
	case room < 0:
		ms = float64(toEnd) // never fits; report the next reset
	case w < 0: // fixed window
		ms = float64(toEnd)
	case float64(c.cur) <= room:
		if c.prev == 0 {
			return 0
		}
		// prev*(win-e)/win + cur <= room  =>  e >= win*(1-(room-cur)/prev)
		e := win * (1 - (room-float64(c.cur))/float64(c.prev))
		ms = e - float64(elapsed)
	default:
		// next bucket: cur*(win-e2)/win <= room  =>  e2 >= win*(1-room/cur)
		ms = float64(toEnd) + win*(1-room/float64(c.cur))
	}
	if ms < 0 {
		ms = 0
	}
	return time.Duration(math.Ceil(ms)) * time.Millisecond
}
