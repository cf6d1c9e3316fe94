--[[
redis_script.lua -- one decision of the Redis store, atomic in Redis: an exact port of
src/lib/algo.c (the seven algorithms) and of limiter.c's decide_state / state_for / report.
Same inputs, same `now` sequence => the same answers as the in-memory store, field for field
(tokens and reserve: the same double), except lease ids (per key here, see "Leases").

LOADING
  A Redis Function library (Redis >= 7.0), not an EVAL script: the build wraps this file as
  "#!lua name=sluice_<sha>" ... "redis.register_function('sluice_<sha>', main)", <sha> the
  first 16 hex digits of this file's SHA1, so that versions never collide. It is loaded with
  FUNCTION LOAD REPLACE (again whenever Redis answers "Function not found"). The library
  body runs once per load, so the ~70 local functions below are made once, not on every
  call as an EVALSHA script's would be (30k -> 49k calls/s on this machine). At load time
  only the Lua core is there: `math` and `struct` are bound on the first call.

CALL
  FCALL sluice_<sha> <k> <key> x k  <now> <op> <cost> <n>  {<alg> <limit> <interval> <window>
                                                            <rinterval> <rcap>} x n
  <k>     1..64 keys (release: 1). k > 1 decides each key in turn, in order, exactly as k
          calls of one key with the same arguments at the same time would (a server groups
          requests that share everything but the key: the call's own cost in Redis is then
          paid once for the group; bench/redis_bench.sh measures it).
  <now>   "" = Redis's clock (TIME); else decimal ns since the Unix epoch, 0 <= now < 2^62.
  <op>    "take": consume <cost> if every limit allows it (cost 0 = peek);
          "peek": what take of <cost> would answer; writes nothing, creates no key;
          "status": what take of 0 answers (the key as it is now: limit_index, remaining,
                  reset_after, delay, tokens, reserve), except allowed and retry_after,
                  which are what a take of <cost> would answer at the same time (sluiced's
                  GET /api/status: one call for both); writes nothing, creates no key;
          "release": <cost> is a lease id to release on the key's concurrency limits.
  <n>     1..4 limits (0 allowed for release), each sl_climit's six integers (algo.h):
          algorithm 1..7, limit, interval ns (token/leaky/burst base, else 0), window ns
          (windows, log, lease TTL, else 0), rinterval ns and rcap (burst_reserve, else 0).
          Every span (interval, window, rinterval, limit*interval, rcap*rinterval) is
          <= 2^52 ns; limit <= 1e9 (log and concurrency <= 100000); cost <= every limit.
  Malformed arguments: an "ERR sluice: ..." error reply, nothing changed.
REPLY
  take/peek/status: one 74-byte string, little-endian (struct '<BBddddddddd'):
             B allowed 0|1, B limit_index (0-based), then doubles: remaining,
             reset_after_ns, retry_after_ns, delay_ns, tokens, reserve, lease (0 = none),
             and the time decided at as whole seconds and ns. All but tokens and reserve
             are integers below 2^53, so exact; tokens and reserve are the doubles
             themselves. (An array of 11 integers and "%.17g" strings cost Redis ~2 us more
             per call, and the caller 12 allocations.)
  k > 1:     an array of the k keys' replies, in key order; an error on one key (say
             WRONGTYPE) is that element, an error reply, and the other keys stand.
  release:   1 released, 0 unknown or already expired (SL_ELEASE). Like sl_release, it acts
             on the limits the key's state was written under; the <n> limits are ignored.

STORAGE (one Redis string per sluice key; little-endian; "d" = IEEE double holding an
integer, exact below 2^53; "I4" = uint32; "B" = byte)
  B  version (1; any other value, or any malformed value, is read as a new key)
  B  number of limits, 1..4
  d  last lease id issued on this key (0 = none)
  then per limit, in policy order:
    B  algorithm 1..7
    d  parameters as called with: limit, interval (token, leaky); limit, window (fixed,
       sliding, log, concurrency); limit, interval, rinterval, rcap (burst_reserve)
    d  base: a whole second S; every time below is ns relative to S*1e9
    token_bucket, leaky_bucket:  d tat, d last
    fixed_window:                d last, d count
    sliding_window:              d last, d cur, d prev
    burst_reserve:               d tat, d z, d last
    sliding_log:                 d last, I4 k, k x d timestamp (oldest first)
    concurrency:                 d last, d used, I4 k, k x {d id, d expiry, I4 weight}
                                 (sorted by expiry)
  The fields are algo.c's state fields (algo.c describes them). A 100000-entry log is
  800 KB. Small states are rewritten relative to the current origin on every write; the
  base of a log or lease list moves only when it is more than 2^21 s (24 days) behind, so
  that a write does not rewrite every entry.
  TTL (PX, ms rounded up, >= 1), set on every write: until the key is indistinguishable from
  a new one (max over limits of sl_algo_full_at - now; burst_reserve: until its base and its
  reserve are both full) and until the clock has passed the last lease id. Redis never holds
  a stale key; a key that has expired is a new key.

TIME IN EXACT ARITHMETIC
  Lua numbers are doubles, exact for integers below 2^53; times are up to 2^62 ns. Each
  limit computes in ns relative to its own origin O = the whole second of its effective time
  n = max(now, last) (algo.c's now'), so n is in [0, 1e9) there. Every span is <= 2^52 and
  every stored time is at most one span after `last`, so stored times are below n + 2^53.
  A time below FLOOR = O - 2^53 <= n - 2^53 (an idle key's tat, z or last, a dead log entry,
  an expired lease) is past every span and two windows (2W <= 2^53) before n: it acts
  exactly as FLOOR would (full, gone, expired, another window), so reading clamps it there.
  (B - O) * 1e9 and O * 1e9 are exact for B, O < 4.6e9 (1e9 = 2^9 * 1953125), so a stored
  offset converts exactly or falls below FLOOR, and a window's phase is fmod(O * 1e9, W).
  Limits of one key normally share `last`; a release moves only the concurrency limits'
  `last`, which is why each limit has its own base and origin (as in C, each state has its
  own `last`).
  Products beyond 2^53 (sliding_window's count * ns up to 2^82, carry_credit's have * T)
  go through muldiv (binary long multiplication keeping a remainder below the divisor), and
  sliding_window's tokens through to_double (one rounding, as C's (double) of the 128-bit
  value). op "selftest" runs these helpers on caller-given operands (tests only).

LEASES
  C numbers leases limiter-wide; here an id is unique per Redis key for ever, across servers
  and across the key expiring: id = max(now in microseconds, last id issued on the key + 1).
  The TTL keeps the key until the clock passes the last id, so a recreated key never
  reissues one. Ids stay below 2^53 (2^62 ns = 4.6e15 us).
]]

local NS = 1e9
local TWO30 = 2 ^ 30
local TWO52 = 2 ^ 52
local TWO53 = 2 ^ 53
local FLOOR = -TWO53         -- lowest time kept, relative to a limit's origin (see above)
local MAX_SEC = 4611686018   -- whole seconds below 2^62 ns ...
local MAX_SEC_NS = 427387904 -- ... and the ns part of 2^62
local REBASE_S = 2 ^ 21      -- a log / lease list base that far behind its origin moves
local MAX_UNITS = 1e9
local MAX_LOG = 100000
local VERSION = 1
local REPLY = '<BBddddddddd' -- a decision's reply (see REPLY above)

local TB, LB, FW, SW, LOG, BR, CC = 1, 2, 3, 4, 5, 6, 7

local fmod, floor, pack, unpack -- bound by main() on its first call (see LOADING)

local function max(a, b) return a > b and a or b end
local function min(a, b) return a < b and a or b end

-- ---- exact integer helpers -------------------------------------------------------------
-- fmod is exact on doubles, so these are exact for integer operands below 2^53.

-- a mod b in [0, b), for integers |a| <= 2^53, 0 < b <= 2^53.
local function mod(a, b)
    local r = fmod(a, b)
    if r < 0 then return r + b end
    return r == 0 and 0 or r -- not -0
end

-- floor(a / b) for integers 0 <= a < 2^53, 0 < b.
local function idiv(a, b)
    return (a - fmod(a, b)) / b
end

-- floor(a * b / m) and (a * b) mod m, for integers 0 <= a, b < 2^53, 1 <= m <= 2^52, when
-- the quotient is below 2^53 (the product may be far above). With b = bq*m + br:
-- a*b = a*bq*m + a*br, and a*br is done bit by bit over a, keeping the remainder r < m so
-- that 2r and r + br stay below 2^53.
local function muldiv(a, b, m)
    local br = fmod(b, m)
    local q = a * ((b - br) / m)
    local p = 1
    while p * 2 <= a do p = p * 2 end
    local q2, r = 0, 0
    while p >= 1 do
        q2, r = q2 * 2, r * 2
        if r >= m then q2, r = q2 + 1, r - m end
        if a >= p then
            a, r = a - p, r + br
            if r >= m then q2, r = q2 + 1, r - m end
        end
        p = p / 2
    end
    return q + q2, r
end

-- (double)(x * w + e), rounded once to nearest even, as C's conversion of the exact 128-bit
-- integer; 0 <= x < 2^31, 0 <= w <= 2^52, 0 <= e < 2^53. The value (< 2^83) is split as
-- hi * 2^30 + lo with hi < 2^53 and lo < 2^30: both exact, so the one addition rounds once.
local function to_double(x, w, e)
    local hi, lo = muldiv(x, w, TWO30)
    local el = fmod(e, TWO30)
    hi, lo = hi + (e - el) / TWO30, lo + el
    if lo >= TWO30 then hi, lo = hi + 1, lo - TWO30 end
    return hi * TWO30 + lo
end

-- ---- arguments -------------------------------------------------------------------------

-- A decimal integer 0..maxv (maxv < 2^53), or nil.
local function int_arg(s, maxv)
    if type(s) ~= 'string' or #s > 16 or not s:find('^%d+$') then return nil end
    local v = tonumber(s)
    if v > maxv then return nil end
    return v
end

local function isint(v, lo, hi)
    return type(v) == 'number' and v == floor(v) and v >= lo and v <= hi
end

local LIMIT_FIELDS = {'limit', 'interval', 'window', 'rinterval', 'rcap'}

-- Validate a limit (from the call or from a stored value) and derive tau / rtau; nil or
-- what is wrong. Parameters an algorithm does not use must be 0.
local function check_limit(c)
    local a = c.alg
    if not isint(a, TB, CC) then return 'unknown algorithm' end
    for _, f in ipairs(LIMIT_FIELDS) do
        if not isint(c[f], 0, TWO52) then return f .. ' is not an integer in 0..2^52' end
    end
    if c.limit < 1 or c.limit > ((a == LOG or a == CC) and MAX_LOG or MAX_UNITS) then
        return 'limit out of range'
    end
    c.tau, c.rtau = 0, 0
    if a == TB or a == LB or a == BR then
        if c.interval < 1 or c.window ~= 0 then return 'needs interval > 0 and window 0' end
        c.tau = c.limit * c.interval -- may round above 2^53, then still > 2^52
        if c.tau > TWO52 then return 'limit * interval over 2^52 ns' end
    elseif c.window < 1 or c.interval ~= 0 then
        return 'needs window > 0 and interval 0'
    end
    if a == BR then
        if c.rinterval < 1 or c.rcap > MAX_UNITS then return 'bad rinterval or rcap' end
        c.rtau = c.rcap * c.rinterval
        if c.rtau > TWO52 then return 'rcap * rinterval over 2^52 ns' end
    elseif c.rinterval ~= 0 or c.rcap ~= 0 then
        return 'rinterval and rcap are for burst_reserve only'
    end
    return nil
end

local function same_params(a, b)
    return a.alg == b.alg and a.limit == b.limit and a.interval == b.interval and
        a.window == b.window and a.rinterval == b.rinterval and a.rcap == b.rcap
end

-- now as (whole second, ns); nil and a message when malformed.
local function parse_now(s)
    if s == '' then
        local t = redis.call('TIME')
        return tonumber(t[1]), tonumber(t[2]) * 1000
    end
    if #s > 19 or not s:find('^%d+$') then return nil, 'now must be "" or ns 0..2^62-1' end
    local sec, ns = tonumber(s:sub(1, -10)) or 0, tonumber(s:sub(-9))
    if sec > MAX_SEC or (sec == MAX_SEC and ns >= MAX_SEC_NS) then
        return nil, 'now must be below 2^62'
    end
    return sec, ns
end

-- ---- a limit at one call: origin, effective time, window phase ---------------------------

-- The effective time n = max(now, last) of a limit whose `last` is B*1e9 + off (off >= 0),
-- as (whole second, ns).
local function effective(B, off, osec, ons)
    local lns = fmod(off, NS)
    local lsec = B + (off - lns) / NS
    if lsec > osec or (lsec == osec and lns > ons) then return lsec, lns end
    return osec, ons
end

-- t mod W for a time t relative to origin O (-2^53 <= t < 2^52): the position in its
-- aligned window. Windows are aligned to multiples of W since the epoch: (O*1e9 + t) mod W.
-- O*1e9 (up to 2^62) is itself exact: 1e9 = 2^9 * 1953125 and O * 1953125 < 2^53.
local function win_pos(c, O, t)
    return mod(fmod(O * NS, c.window) + t, c.window)
end

-- Aligned windows from the one holding `last` to the one holding n (>= last): 0, 1 or 2
-- (two or more). Far-apart times are told apart first so that n - last stays exact.
local function win_gap(c, O, last, n)
    local W = c.window
    if last < n - 2 * W then return 2 end
    local d = (n - last) - win_pos(c, O, n) + win_pos(c, O, last) -- start(n) - start(last)
    if d == 0 then return 0 end
    return d == W and 1 or 2
end

-- ---- token_bucket / leaky_bucket (GCRA) -------------------------------------------------
-- As algo.c: tat = the time at which the bucket is full; credit = tau - max(0, tat - n').
-- Here and below n is the limit's effective time (now'), relative to its origin.

local function gcra_check(c, s, cost, n, o)
    local T = c.interval
    local backlog = s.tat > n and s.tat - n or 0
    local have = backlog >= c.tau and 0 or c.tau - backlog
    local need = cost * T -- cost <= limit, so need <= tau
    if need <= have then
        o.allowed = true
        o.remaining = idiv(have - need, T)
        o.reset = backlog + need
        o.tokens = (have - need) / T
        if c.alg == LB then o.delay = backlog end
    else
        o.remaining = idiv(have, T)
        o.reset = backlog
        o.retry = backlog + need - c.tau -- the backlog may exceed tau after a policy change
        o.tokens = have / T
    end
end

local function gcra_commit(c, s, cost, n)
    s.tat = max(s.tat, n) + cost * c.interval
    s.last = n
end

-- Credit carried from (have ns, t_old) to t_new: floor(have * t_new / t_old), at most cap.
local function carry_credit(have, t_old, t_new, cap)
    if have <= 0 then return 0 end
    -- have * floor(t_new / t_old) rounds above 2^53 only when it is far above cap
    if have * ((t_new - fmod(t_new, t_old)) / t_old) > cap then return cap end
    return min(cap, (muldiv(have, t_new, t_old)))
end

-- ---- fixed_window ---------------------------------------------------------------------

local function fw_roll(c, O, s, n)
    if win_gap(c, O, s.last, n) ~= 0 then s.count = 0 end
    s.last = n
end

local function fw_check(c, O, s, cost, n, o)
    local L = c.limit
    local to_end = c.window - win_pos(c, O, n)
    local used = win_gap(c, O, s.last, n) ~= 0 and 0 or min(s.count, L)
    if used + cost <= L then
        o.allowed = true
        o.remaining = L - used - cost
        o.reset = used + cost > 0 and to_end or 0
    else
        o.remaining = L - used
        o.reset = used > 0 and to_end or 0
        o.retry = to_end
    end
    o.tokens = o.remaining
end

-- ---- sliding_window -----------------------------------------------------------------------
-- algo.c admits iff prev*(W-e) + cur*W + cost*W <= L*W (128-bit). With prev*e = qe*W + re
-- (muldiv, 0 <= re < W) the room left after the request is
--     L*W - est - cost*W = A*W + re,   A = L - cur - cost - prev + qe,
-- so it passes iff A >= 0, remaining = floor(room / W) = A, and tokens = room / W.

local function sw_roll(c, O, s, n)
    local gap = win_gap(c, O, s.last, n)
    if gap ~= 0 then
        s.prev = gap == 1 and s.cur or 0
        s.cur = 0
    end
    s.last = n
end

local function sw_check(c, O, s0, cost, n, o)
    local s = {last = s0.last, cur = s0.cur, prev = s0.prev}
    sw_roll(c, O, s, n)
    local W, L, cur, prev = c.window, c.limit, s.cur, s.prev
    local e = win_pos(c, O, n)
    local to_end = W - e -- start + W - n'; offsets from n' stay below 2^53, start + 2W may not
    local qe, re = muldiv(prev, e, W)
    local A = L - cur - cost - prev + qe
    local cur_after = cur
    if A >= 0 then
        o.allowed = true
        o.remaining = A
        o.tokens = to_double(A, W, re) / W
        cur_after = cur + cost
    else
        -- the room before the request: (A + cost)*W + re, zero or less when A + cost < 0
        local A0 = A + cost
        o.remaining = max(A0, 0)
        o.tokens = A0 < 0 and 0 or to_double(A0, W, re) / W
        -- smallest t >= n' at which it passes (algo.c's closed form), as t - n'
        local k = 0
        if prev > 0 and cur <= L - cost then
            -- this window: prev*(W - e_t) <= (L-cost-cur)*W; k < W - e since denied now
            k = muldiv(L - cost - cur, W, prev)
        end
        if k >= 1 then
            o.retry = to_end - k
        else
            -- next window: prev' = cur, cur' = 0: cur*(W - e') <= (L-cost)*W
            local wait = 0
            if cur > 0 and L - cost < cur then wait = W - muldiv(L - cost, W, cur) end
            o.retry = to_end + wait
        end
    end
    if cur_after > 0 then
        o.reset = to_end + W
    elseif prev > 0 then
        o.reset = to_end
    end
end

-- ---- sliding_log --------------------------------------------------------------------------
-- The timestamps stay a packed string (8 bytes each, oldest first) read where needed: a
-- decision reads O(log k) of them, and a commit is two string operations.

local function log_at(s, i) -- timestamp i (0 = oldest), relative to the origin
    return max(FLOOR, unpack('<d', s.blob, 8 * i + 1) + s.boff)
end

-- Index of the first timestamp > cut.
local function log_first_after(s, cut)
    local lo, hi = 0, s.k
    while lo < hi do
        local mid = floor((lo + hi) / 2)
        if log_at(s, mid) > cut then hi = mid else lo = mid + 1 end
    end
    return lo
end

local function log_check(c, s, cost, n, o)
    local L, W = c.limit, c.window
    local i = log_first_after(s, n - W)
    local live = s.k - i
    if live + cost <= L then
        o.allowed = true
        o.remaining = L - live - cost
        if cost > 0 then
            o.reset = W
        elseif live > 0 then
            o.reset = log_at(s, s.k - 1) + W - n
        end
    else
        o.remaining = L - live
        o.reset = log_at(s, s.k - 1) + W - n -- live > 0 here
        o.retry = log_at(s, i + (live + cost - L) - 1) + W - n -- the oldest k must expire
    end
    o.tokens = o.remaining
end

local function log_commit(c, s, cost, n)
    local i = log_first_after(s, n - c.window)
    local add = min(cost, c.limit - (s.k - i))
    s.blob = s.blob:sub(8 * i + 1) .. string.rep(pack('<d', n - s.boff), add)
    s.k = s.k - i + add
    s.last = n
end

-- ---- burst_reserve -----------------------------------------------------------------------
-- Base: a GCRA (tat); reserve: reserve_ns = min(rtau, n' - z). Served wholly by the base if
-- it has `cost`, else wholly by the reserve, else denied. cost*rinterval may exceed 2^53:
-- then it exceeds every credit (<= 2^52), and the rounded product compares the same way.

local function br_look(c, s, n)
    local backlog = s.tat > n and s.tat - n or 0
    local r = n - s.z -- rounds only far above rtau
    return backlog, backlog >= c.tau and 0 or c.tau - backlog,
        r <= 0 and 0 or min(r, c.rtau)
end

local function br_check(c, s, cost, n, o)
    local T, RT = c.interval, c.rinterval
    local backlog, bhave, rhave = br_look(c, s, n)
    local bneed, rneed = cost * T, cost * RT
    local bafter, rafter = bhave, rhave
    if bneed <= bhave then
        o.allowed = true
        bafter = bafter - bneed
        o.reset = backlog + bneed
    elseif rneed <= rhave then
        o.allowed = true
        o.via_reserve = true
        rafter = rafter - rneed
        o.reset = backlog
    else
        o.reset = backlog
        local wait = bneed - bhave
        if rneed <= c.rtau then wait = min(wait, rneed - rhave) end
        o.retry = wait
    end
    o.remaining = idiv(bafter, T) + idiv(rafter, RT)
    o.tokens = bafter / T
    o.reserve = rafter / RT
end

local function br_commit(c, s, cost, n, via_reserve)
    if via_reserve then
        s.z = max(s.z, n - c.rtau) + cost * c.rinterval
    else
        s.tat = max(s.tat, n) + cost * c.interval
    end
    s.last = n
end

-- ---- concurrency -------------------------------------------------------------------------
-- Leases {id, expiry, weight} in a packed string (20 bytes each) sorted by expiry; expiry
-- <= n' frees a lease.

local CC_REC = 20

local function cc_at(s, j) -- id, expiry (relative to the origin), weight of lease j
    local id, ex, w = unpack('<ddI4', s.blob, CC_REC * j + 1)
    return id, max(FLOOR, ex + s.boff), w
end

-- Number of expired leases at the front, and their weight.
local function cc_expired(s, n)
    local i, w = 0, 0
    while i < s.k do
        local _, ex, wt = cc_at(s, i)
        if ex > n then break end
        i, w = i + 1, w + wt
    end
    return i, w
end

local function cc_drop_expired(s, n)
    local i, w = cc_expired(s, n)
    s.blob = s.blob:sub(CC_REC * i + 1)
    s.k, s.used = s.k - i, s.used - w
end

local function cc_check(c, s, cost, n, o)
    local N = c.limit
    local i, ew = cc_expired(s, n)
    local live = s.used - ew
    local latest = n
    if s.k > i then latest = select(2, cc_at(s, s.k - 1)) end
    if live + cost <= N then
        o.allowed = true
        o.remaining = N - live - cost
        if cost > 0 then latest = max(latest, n + c.window) end
    else
        o.remaining = N - live
        local k, acc, t = live + cost - N, 0, n -- slots that must free
        local j = i
        while j < s.k and acc < k do
            local _, ex, w = cc_at(s, j)
            acc, t, j = acc + w, ex, j + 1
        end
        o.retry = t - n
    end
    o.reset = latest - n
    o.tokens = o.remaining
end

local function cc_commit(c, s, cost, n, lease)
    cc_drop_expired(s, n)
    if cost > 0 and s.k < c.limit then
        local ex = n + c.window
        local pos = s.k -- insert in expiry order (normally at the end)
        while pos > 0 and select(2, cc_at(s, pos - 1)) > ex do pos = pos - 1 end
        s.blob = s.blob:sub(1, CC_REC * pos) .. pack('<ddI4', lease, ex - s.boff, cost) ..
            s.blob:sub(CC_REC * pos + 1)
        s.k, s.used = s.k + 1, s.used + cost
    end
    s.last = n
end

-- Release lease `id`: true if it was held. Drops expired leases and moves `last` either way.
local function cc_release(s, id, n)
    cc_drop_expired(s, n)
    s.last = n
    local pat, from = pack('<d', id), 1
    while true do
        local p = s.blob:find(pat, from, true)
        if not p then return false end
        if (p - 1) % CC_REC == 0 then
            local j = (p - 1) / CC_REC
            s.used = s.used - select(3, cc_at(s, j))
            s.blob = s.blob:sub(1, CC_REC * j) .. s.blob:sub(CC_REC * (j + 1) + 1)
            s.k = s.k - 1
            return true
        end
        from = p + 1
    end
end

-- ---- the interface (algo.h) ----------------------------------------------------------------
-- A limit at a call is x = {c = parameters, O = origin second, n = effective time, s = state}.

local function new_state(c, O, t)
    local a = c.alg
    if a == TB or a == LB then return {tat = t, last = t} end
    if a == BR then return {tat = t, z = t, last = t} end
    if a == FW then return {last = t, count = 0} end
    if a == SW then return {last = t, cur = 0, prev = 0} end
    if a == LOG then return {last = t, k = 0, blob = '', B = O, boff = 0} end
    return {last = t, used = 0, k = 0, blob = '', B = O, boff = 0}
end

-- sl_algo_check: what `cost` would get at the limit's effective time.
local function check(x, cost)
    local o = {allowed = false, remaining = 0, reset = 0, retry = 0, delay = 0, tokens = 0,
               reserve = 0, via_reserve = false}
    local c, s, n, a = x.c, x.s, x.n, x.c.alg
    if a == TB or a == LB then gcra_check(c, s, cost, n, o)
    elseif a == FW then fw_check(c, x.O, s, cost, n, o)
    elseif a == SW then sw_check(c, x.O, s, cost, n, o)
    elseif a == LOG then log_check(c, s, cost, n, o)
    elseif a == BR then br_check(c, s, cost, n, o)
    else cc_check(c, s, cost, n, o) end
    return o
end

-- sl_algo_commit after every limit allowed it (chk = this limit's check).
local function commit(x, cost, chk, lease)
    local c, s, n, a = x.c, x.s, x.n, x.c.alg
    if a == TB or a == LB then gcra_commit(c, s, cost, n)
    elseif a == FW then fw_roll(c, x.O, s, n); s.count = s.count + cost
    elseif a == SW then sw_roll(c, x.O, s, n); s.cur = s.cur + cost
    elseif a == LOG then log_commit(c, s, cost, n)
    elseif a == BR then br_commit(c, s, cost, n, chk.via_reserve)
    else cc_commit(c, s, cost, n, lease) end
end

-- sl_algo_touch: a denied take remembers the latest time.
local function touch(x)
    local a = x.c.alg
    if a == FW then fw_roll(x.c, x.O, x.s, x.n)
    elseif a == SW then sw_roll(x.c, x.O, x.s, x.n)
    else x.s.last = x.n end
end

-- When the limit is indistinguishable from a new one (relative to its origin), as a sum of
-- two exact parts (the sliding window's start + 2W may round): algo.c's sl_algo_full_at,
-- and for burst_reserve when the base and the reserve are both full.
local function full_at(x)
    local c, s, a = x.c, x.s, x.c.alg
    if a == TB or a == LB then return s.tat end
    if a == BR then return max(s.tat, s.z + c.rtau) end
    if a == FW or a == SW then
        local start = s.last - win_pos(c, x.O, s.last)
        if a == FW then return s.count > 0 and start + c.window or start end
        if s.cur > 0 then return start + c.window, c.window end
        return s.prev > 0 and start + c.window or start
    end
    if s.k == 0 then return s.last end
    if a == LOG then return log_at(s, s.k - 1) + c.window end
    return (select(2, cc_at(s, s.k - 1)))
end

local function carry_used(l_old, used_old, l_new)
    local rem = used_old >= l_old and 0 or l_old - used_old
    return rem >= l_new and 0 or l_new - rem
end

-- algo.c's carry_across: the state of x under nc of another algorithm, at x's effective
-- time: R = min(whole units x leaves, nc.limit), built to leave exactly R (a full x: full);
-- to or from concurrency, fresh.
local function carry_across(x, nc)
    local oc, o, n, O = x.c, x.s, x.n, x.O
    local s = new_state(nc, O, n)
    local res = {c = nc, O = O, n = n, s = s}
    if oc.alg == CC or nc.alg == CC then return res end
    local r = check(x, 0).remaining
    local full
    if oc.alg == BR then full = o.tat <= n else full = r >= oc.limit end
    if full or r >= nc.limit then return res end
    local used, a = nc.limit - r, nc.alg
    if a == TB or a == LB or a == BR then
        s.tat = n + used * nc.interval -- <= n + tau: exact
    elseif a == FW then
        s.count = used
    elseif a == SW then
        s.cur = used
    else -- LOG: L - R timestamps at n (new_state's base is the origin O)
        s.blob, s.k = string.rep(pack('<d', n), used), used
    end
    return res
end

-- sl_algo_carry: the state of x (other parameters) under nc, at x's effective time; the key
-- keeps its remaining units, clamped to the new capacity.
local function carry(x, nc)
    local oc, o, n, O, a = x.c, x.s, x.n, x.O, x.c.alg
    if a ~= nc.alg then return carry_across(x, nc) end
    local s = new_state(nc, O, n)
    if a == LB then
        -- queued requests keep their departure times (algo.c says why)
        if o.tat > n then s.tat = o.tat end
    elseif a == TB then
        local backlog = o.tat > n and o.tat - n or 0
        if backlog > 0 then
            local have = backlog >= oc.tau and 0 or oc.tau - backlog
            s.tat = n + (nc.tau - carry_credit(have, oc.interval, nc.interval, nc.tau))
        end
    elseif a == BR then
        local backlog, bhave, rhave = br_look(oc, o, n)
        if backlog > 0 then
            s.tat = n + (nc.tau - carry_credit(bhave, oc.interval, nc.interval, nc.tau))
        end
        s.z = n - carry_credit(rhave, oc.rinterval, nc.rinterval, nc.rtau)
    elseif a == FW then
        local r = {last = o.last, count = o.count}
        fw_roll(oc, O, r, n)
        if r.count > 0 then s.count = carry_used(oc.limit, r.count, nc.limit) end
    elseif a == SW then
        local r = {last = o.last, cur = o.cur, prev = o.prev}
        sw_roll(oc, O, r, n)
        if r.cur > 0 or r.prev > 0 then
            local k = check({c = oc, O = O, n = n, s = r}, 0)
            -- the units in use move into the current window of the new alignment
            s.cur = carry_used(oc.limit, oc.limit - k.remaining, nc.limit)
        end
    elseif a == LOG then
        -- live under the old window and under the new one, the newest that fit
        local i = log_first_after(o, n - min(oc.window, nc.window))
        local keep = min(o.k - i, nc.limit)
        s.blob, s.k, s.B, s.boff = o.blob:sub(8 * (o.k - keep) + 1), keep, o.B, o.boff
    else
        -- the live leases with the latest expiries that fit; the oldest one kept may keep
        -- only part of its weight
        local i = cc_expired(o, n)
        local room, first_w, j = nc.limit, 0, o.k
        while j > i and room > 0 do
            j = j - 1
            first_w = min(select(3, cc_at(o, j)), room)
            room = room - first_w
        end
        s.B, s.boff = o.B, o.boff
        if j < o.k then
            local id, ex = unpack('<dd', o.blob, CC_REC * j + 1)
            s.blob = pack('<ddI4', id, ex, first_w) .. o.blob:sub(CC_REC * (j + 1) + 1)
            s.k, s.used = o.k - j, nc.limit - room
        end
    end
    return {c = nc, O = O, n = n, s = s}
end

-- ---- the stored value ----------------------------------------------------------------------

local PARAMS = {[TB] = {'limit', 'interval'}, [LB] = {'limit', 'interval'},
                [FW] = {'limit', 'window'}, [SW] = {'limit', 'window'},
                [LOG] = {'limit', 'window'}, [CC] = {'limit', 'window'},
                [BR] = {'limit', 'interval', 'rinterval', 'rcap'}}
-- fixed-size states: their time fields and count fields, in stored order
local FIELDS = {[TB] = {'tat', 'last'}, [LB] = {'tat', 'last'}, [BR] = {'tat', 'z', 'last'},
                [FW] = {'last', 'count'}, [SW] = {'last', 'cur', 'prev'}}
local IS_TIME = {tat = true, z = true, last = true}

local function isoff(v) return isint(v, -TWO53, TWO53) end

-- One stored limit from position p: the record (raw offsets) and the next position; error()
-- when malformed (the caller's pcall turns that into "a new key").
local function parse_rec(v, p)
    local start = p
    local r = {c = {limit = 0, interval = 0, window = 0, rinterval = 0, rcap = 0}}
    local a
    a, p = unpack('<B', v, p)
    r.c.alg = a
    assert(PARAMS[a])
    for _, f in ipairs(PARAMS[a]) do r.c[f], p = unpack('<d', v, p) end
    assert(check_limit(r.c) == nil)
    r.B, p = unpack('<d', v, p)
    assert(isint(r.B, 0, MAX_SEC))
    if FIELDS[a] then
        for _, f in ipairs(FIELDS[a]) do r[f], p = unpack('<d', v, p) end
        -- small states are written relative to the second of `last`
        assert(isint(r.last, 0, NS - 1))
        for _, f in ipairs(FIELDS[a]) do
            if IS_TIME[f] then assert(isoff(r[f])) else assert(isint(r[f], 0, r.c.limit)) end
        end
        if a ~= FW and a ~= SW then assert(r.tat <= r.last + TWO52) end
        if a == BR then assert(r.z <= r.last) end
    else
        r.last, p = unpack('<d', v, p)
        assert(isint(r.last, 0, (REBASE_S + 1) * NS))
        if a == CC then
            r.used, p = unpack('<d', v, p)
            assert(isint(r.used, 0, r.c.limit))
        end
        r.k, p = unpack('<I4', v, p)
        assert(r.k <= r.c.limit)
        local len = (a == LOG and 8 or CC_REC) * r.k
        r.blob = v:sub(p, p + len - 1)
        assert(#r.blob == len)
        p = p + len
    end
    r.raw = v:sub(start, p - 1)
    return r, p
end

local function parse_value(v)
    local ver, n, lastid, p = unpack('<BBd', v, 1)
    assert(ver == VERSION and n >= 1 and n <= 4 and isint(lastid, 0, TWO53 - 1))
    local recs = {}
    for i = 1, n do recs[i], p = parse_rec(v, p) end
    assert(p == #v + 1)
    return {lastid = lastid, recs = recs}
end

-- The stored value: {lastid, recs}, or nil for a missing, unknown or malformed value.
local function parse(v)
    if not v then return nil end
    local ok, res = pcall(parse_value, v)
    return ok and res or nil
end

-- A stored limit at this call (now = osec*1e9 + ons), relative to its origin. A log or lease
-- list whose base is more than REBASE_S behind moves to the origin (every entry rewritten).
local function open(r, osec, ons)
    local O, n = effective(r.B, r.last, osec, ons)
    local boff = (r.B - O) * NS -- exact: |B - O| < 4.6e9
    local s = {}
    if FIELDS[r.c.alg] then
        for _, f in ipairs(FIELDS[r.c.alg]) do
            s[f] = IS_TIME[f] and max(FLOOR, r[f] + boff) or r[f]
        end
    else
        s.last, s.used, s.k, s.blob, s.B, s.boff =
            max(FLOOR, r.last + boff), r.used, r.k, r.blob, r.B, boff
        if O - r.B > REBASE_S then
            local out = {}
            for j = 0, s.k - 1 do
                if r.c.alg == LOG then
                    out[#out + 1] = pack('<d', log_at(s, j))
                else
                    out[#out + 1] = pack('<ddI4', cc_at(s, j))
                end
            end
            s.blob, s.B, s.boff = table.concat(out), O, 0
        end
    end
    return {c = r.c, O = O, n = n, s = s}
end

local function encode_limit(x)
    local c, s, a = x.c, x.s, x.c.alg
    local out = {pack('<B', a)}
    for _, f in ipairs(PARAMS[a]) do out[#out + 1] = pack('<d', c[f]) end
    if FIELDS[a] then
        out[#out + 1] = pack('<d', x.O) -- base = origin: the times are as they are
        for _, f in ipairs(FIELDS[a]) do out[#out + 1] = pack('<d', s[f]) end
    else
        out[#out + 1] = pack('<dd', s.B, s.last - s.boff)
        if a == CC then out[#out + 1] = pack('<d', s.used) end
        out[#out + 1] = pack('<I4', s.k)
        out[#out + 1] = s.blob
    end
    return table.concat(out)
end

-- ms (rounded up) from now = osec*1e9 + ons until the time O*1e9 + t + t2 (|t|, |t2| <=
-- 2^53, ons < 1e9): the parts are split into whole ms and a rest below 1 ms, summed apart.
local function ms_until(O, t, t2, osec, ons)
    local tr, t2r, nr = mod(t, 1e6), mod(t2, 1e6), mod(ons, 1e6)
    local ms = (O - osec) * 1000 + (t - tr) / 1e6 + (t2 - t2r) / 1e6 - (ons - nr) / 1e6
    local rest = tr + t2r - nr -- in (-1e6, 2e6)
    if rest > 1e6 then return ms + 2 end
    return rest > 0 and ms + 1 or ms
end

-- Write the value (limits xs, each opened, or a parsed record that a release left as it
-- was: its bytes are kept, and it is opened for the TTL) with its TTL: until every limit is
-- indistinguishable from a new one and the clock has passed the last lease id.
local function store(key, lastid, xs, osec, ons)
    local parts = {pack('<BBd', VERSION, #xs, lastid)}
    local ttl = 1
    for _, x in ipairs(xs) do
        if x.raw then
            parts[#parts + 1] = x.raw
            x = open(x, osec, ons)
        else
            parts[#parts + 1] = encode_limit(x)
        end
        local t, t2 = full_at(x)
        ttl = max(ttl, ms_until(x.O, t, t2 or 0, osec, ons))
    end
    if lastid > 0 then
        -- the clock passes id (us) at (id + 1) * 1000 ns: us microseconds after osec
        local us = lastid + 1 - osec * 1e6
        local usr = mod(us, 1000)
        ttl = max(ttl, (us - usr) / 1000 + ms_until(0, usr * 1000, 0, 0, ons))
    end
    redis.call('SET', key, table.concat(parts), 'PX', string.format('%.0f', ttl))
end

-- ---- a decision (limiter.c's decide_state) ----------------------------------------------

-- Which stored limit each called limit carries its state from (limiter.c's match_limits):
-- each stored one used once; first one with the same parameters, then the one at the same
-- position with the same algorithm, then the first with the same algorithm; last, the
-- first one still unused (of another algorithm), concurrency on neither side.
local function pairs_in(pass, i, j, c, o)
    if pass == 0 then return same_params(o, c) end
    if pass == 1 then return j == i and o.alg == c.alg end
    if pass == 2 then return o.alg == c.alg end
    return o.alg ~= CC and c.alg ~= CC -- any other, but leases are not units
end

local function match_limits(recs, limits)
    local from, used = {}, {}
    for pass = 0, 3 do
        for i, c in ipairs(limits) do
            for j, r in ipairs(recs) do
                if not from[i] and not used[j] and pairs_in(pass, i, j, c, r.c) then
                    from[i], used[j] = j, true
                end
            end
        end
    end
    return from
end

-- The limits of the key under the called policy (limiter.c's state_for): each carried over
-- from the stored limit match_limits pairs it with, else fresh at `now`.
local function states_for(stored, limits, osec, ons)
    local from = stored and match_limits(stored.recs, limits) or {}
    local xs = {}
    for i, c in ipairs(limits) do
        if from[i] then
            local x = open(stored.recs[from[i]], osec, ons)
            xs[i] = same_params(x.c, c) and x or carry(x, c)
            xs[i].c = c
        else
            xs[i] = {c = c, O = osec, n = ons, s = new_state(c, osec, ons)}
        end
    end
    return xs
end

-- status: the decision of a take of cost 0 (take is false), whose allowed and retry_after
-- are then those of a peek of <cost> at the same time (see CALL).
local function decide(key, stored, limits, cost, take, status, osec, ons)
    local xs = states_for(stored, limits, osec, ons)
    local lastid = stored and stored.lastid or 0
    local chk, ok, has_lease = {}, true, false
    for i, x in ipairs(xs) do
        chk[i] = check(x, status and 0 or cost)
        ok = ok and chk[i].allowed
        has_lease = has_lease or x.c.alg == CC
    end
    local lease = 0
    if take then
        if ok then
            if has_lease then
                lease = max(osec * 1e6 + floor(ons / 1000), lastid + 1)
                lastid = lease
            end
            for i, x in ipairs(xs) do commit(x, cost, chk[i], lease) end
        else
            for _, x in ipairs(xs) do touch(x) end
        end
        store(key, lastid, xs, osec, ons)
    end
    -- Report the most restrictive limit: when denied, the one that makes the caller wait
    -- longest; when allowed, the one with the fewest units left.
    local r = 1
    for i = 2, #xs do
        local a, b = chk[i], chk[r]
        local better
        if ok then
            better = a.remaining < b.remaining or
                (a.remaining == b.remaining and a.reset > b.reset)
        else
            better = not a.allowed and (b.allowed or a.retry > b.retry)
        end
        if better then r = i end
    end
    local delay, reserve = 0, 0
    for i, x in ipairs(xs) do
        if ok and chk[i].delay > delay then delay = chk[i].delay end
        if x.c.alg == BR then reserve = chk[i].reserve end
    end
    local d = chk[r]
    local retry = ok and 0 or d.retry
    if status then
        -- would <cost> pass, and when: the denying limit that waits longest (as decide
        -- reports a denial); check() reads only, so the states are as they were
        ok, retry = true, 0
        for _, x in ipairs(xs) do
            local o = check(x, cost)
            if not o.allowed then
                ok = false
                if o.retry > retry then retry = o.retry end
            end
        end
    end
    return pack(REPLY, ok and 1 or 0, r - 1, d.remaining, d.reset, retry, delay,
                d.tokens, reserve, lease, osec, ons)
end

-- The common case without the general path's tables: a take, peek or status under one
-- token_bucket limit, on a new key or on a value holding exactly that limit (same
-- parameters) and no lease id. The same functions and the same bytes as decide() would use
-- and write (the differential test runs both); nil when the value is anything else:
-- decide() takes it.
local TB1 = '<BBdBddddd' -- version, 1, lastid, TB, limit, interval, base, tat, last
local TB1_LEN = 51

local function decide_tb(key, v, c, cost, take, status, osec, ons)
    local O, n, tat, last = osec, ons, ons, ons
    if v then
        if #v ~= TB1_LEN then return nil end
        local ver, nl, lastid, a, limit, interval, B, stat, slast = unpack(TB1, v, 1)
        -- isint and isoff, effective and (below) idiv and ms_until, written out: a Lua call
        -- costs about as much as the arithmetic
        if ver ~= VERSION or nl ~= 1 or lastid ~= 0 or a ~= TB or limit ~= c.limit or
            interval ~= c.interval or B ~= floor(B) or B < 0 or B > MAX_SEC or
            slast ~= floor(slast) or slast < 0 or slast > NS - 1 or stat ~= floor(stat) or
            stat < -TWO53 or stat > TWO53 or stat > slast + TWO52 then
            return nil
        end
        if B > osec or (B == osec and slast > ons) then O, n = B, slast end -- effective()
        local boff = (B - O) * NS
        tat, last = stat + boff, slast + boff
        if tat < FLOOR then tat = FLOOR end
        if last < FLOOR then last = FLOOR end
    end
    -- gcra_check and gcra_commit, written out: no tables for the state and the outcome
    -- (the same operations in the same order, so the same doubles)
    local T, tau = c.interval, c.tau
    local backlog = tat > n and tat - n or 0
    local have = backlog >= tau and 0 or tau - backlog
    local need = cost * T -- cost <= limit, so need <= tau
    local allowed, remaining, reset, retry, tokens
    if status then
        -- gcra_check of cost 0 (which passes), and of <cost> for allowed and retry
        allowed, retry = 0, backlog + need - tau
        if need <= have then allowed, retry = 1, 0 end
        return pack(REPLY, allowed, 0, (have - fmod(have, T)) / T, backlog, retry, 0, have / T,
                    0, 0, osec, ons)
    end
    if need <= have then
        local left = have - need
        allowed, remaining, reset, retry = 1, (left - fmod(left, T)) / T, backlog + need, 0
        tokens = left / T
    else
        allowed, remaining, reset, retry = 0, (have - fmod(have, T)) / T, backlog,
                                           backlog + need - tau
        tokens = have / T
    end
    if take then
        if allowed == 1 then tat = (tat > n and tat or n) + cost * T end
        last = n
        local tr, nr = fmod(tat, 1e6), fmod(ons, 1e6) -- ms_until(O, tat, 0, osec, ons)
        if tr < 0 then tr = tr + 1e6 end
        local ttl = (O - osec) * 1000 + (tat - tr) / 1e6 - (ons - nr) / 1e6
        local rest = tr - nr
        if rest > 1e6 then ttl = ttl + 2 elseif rest > 0 then ttl = ttl + 1 end
        -- formatted here: Redis 7.2.0-7.2.4 format a number argument such as 1e8 as "1e+8"
        redis.call('SET', key, pack(TB1, VERSION, 1, 0, TB, c.limit, T, O, tat, last), 'PX',
                   string.format('%.0f', ttl > 1 and ttl or 1))
    end
    return pack(REPLY, allowed, 0, remaining, reset, retry, 0, tokens, 0, 0, osec, ons)
end

-- sl_release: on the stored limits; only the concurrency ones change.
local function release(key, stored, id, osec, ons)
    if not stored or id == 0 then return 0 end
    local xs, found, any = {}, false, false
    for i, r in ipairs(stored.recs) do
        if r.c.alg == CC then
            xs[i] = open(r, osec, ons)
            if cc_release(xs[i].s, id, xs[i].n) then found = true end
            any = true
        else
            xs[i] = r
        end
    end
    if any then store(key, stored.lastid, xs, osec, ons) end
    return found and 1 or 0
end

-- ---- self test of the exact helpers (tests only; changes nothing) -----------------------
-- ARGV: "selftest" then the helper's name and its integer operands; replies its results as
-- decimal strings.
local function selftest(args)
    local v = {}
    for i = 2, #args do v[i - 1] = tonumber(args[i]) end
    local res
    if args[1] == 'muldiv' then res = {muldiv(v[1], v[2], v[3])}
    elseif args[1] == 'to_double' then res = {to_double(v[1], v[2], v[3])}
    elseif args[1] == 'carry_credit' then res = {carry_credit(v[1], v[2], v[3], v[4])}
    elseif args[1] == 'win_pos' then res = {win_pos({window = v[1]}, v[2], v[3])}
    elseif args[1] == 'ms_until' then res = {ms_until(v[1], v[2], v[3], v[4], v[5])}
    else return redis.error_reply('ERR sluice: unknown selftest') end
    for i = 1, #res do res[i] = string.format('%.17g', res[i]) end
    return res
end

-- ---- the call ----------------------------------------------------------------------------

-- The limits of a call (ARGV[4], then 6 integers per limit), validated, with tau / rtau;
-- nil and what is wrong. Checking them costs more than a token bucket's whole decision
-- (~4.7 of ~14 us of Redis time per call, measured with INFO commandstats), and a server
-- sends the same few policies again and again, so validated limits are kept by their
-- arguments joined with spaces. The key is unambiguous because a hit also needs the same
-- argument count: valid arguments hold no spaces, so equal joined strings with as many
-- parts are equal parts. Derived from the arguments alone, a kept entry changes no answer
-- (and nothing mutates a limit once checked); the table is dropped when it passes
-- LIMITS_KEPT entries, so it stays small whatever callers send.
local LIMITS_KEPT = 1024
local kept, nkept = {}, 0

local function limits_of(ARGV)
    local k = table.concat(ARGV, ' ', 4)
    local limits = kept[k]
    if limits and #ARGV == 4 + 6 * #limits then return limits end
    local nl = int_arg(ARGV[4], 4)
    if not nl or #ARGV ~= 4 + 6 * nl then return nil, '1..4 limits of 6 integers each' end
    limits = {}
    for i = 1, nl do
        local b, c = 4 + 6 * (i - 1), {}
        c.alg = int_arg(ARGV[b + 1], 255)
        c.limit = int_arg(ARGV[b + 2], TWO52)
        c.interval = int_arg(ARGV[b + 3], TWO52)
        c.window = int_arg(ARGV[b + 4], TWO52)
        c.rinterval = int_arg(ARGV[b + 5], TWO52)
        c.rcap = int_arg(ARGV[b + 6], TWO52)
        local err = check_limit(c)
        if err then return nil, 'limit ' .. i .. ': ' .. err end
        limits[i] = c
    end
    if nkept >= LIMITS_KEPT then kept, nkept = {}, 0 end
    kept[k], nkept = limits, nkept + 1
    return limits
end


-- One key's decision (or release) under the call's validated arguments; tb: the one
-- token-bucket limit when decide_tb may take it, take: a take that consumes (cost > 0).
local function one(key, op, limits, tb, cost, take, osec, ons)
    local v = redis.call('GET', key)
    local status = op == 'status'
    if tb then
        local res = decide_tb(key, v, tb, cost, take, status, osec, ons)
        if res then return res end
    end
    local stored = parse(v)
    if op == 'release' then return release(key, stored, cost, osec, ons) end
    return decide(key, stored, limits, cost, take, status, osec, ons)
end

local MAX_KEYS = 64 -- keys one take, peek or status call may decide (see CALL)

local function main(KEYS, ARGV)
    if not fmod then
        fmod, floor, pack, unpack = math.fmod, math.floor, struct.pack, struct.unpack
    end
    if ARGV[1] == 'selftest' then
        local args = {}
        for i = 2, #ARGV do args[i - 1] = ARGV[i] end
        return selftest(args)
    end
    local nk, op = #KEYS, ARGV[2]
    if op ~= 'take' and op ~= 'peek' and op ~= 'status' and op ~= 'release' then
        return redis.error_reply('ERR sluice: op must be take, peek, status or release')
    end
    if nk < 1 or nk > MAX_KEYS or (nk > 1 and op == 'release') then
        return redis.error_reply('ERR sluice: 1..64 keys (release: one)')
    end
    local limits, err = limits_of(ARGV)
    if not limits then return redis.error_reply('ERR sluice: ' .. err) end
    if #limits == 0 and op ~= 'release' then
        return redis.error_reply('ERR sluice: 1..4 limits of 6 integers each')
    end
    local osec, ons = parse_now(ARGV[1])
    if not osec then return redis.error_reply('ERR sluice: ' .. ons) end
    local cost = ARGV[3] == '1' and 1 or int_arg(ARGV[3], TWO53 - 1) -- 1: the usual cost
    if not cost then return redis.error_reply('ERR sluice: cost must be an integer') end
    if op ~= 'release' then
        for i = 1, #limits do
            if cost > limits[i].limit then
                return redis.error_reply('ERR sluice: cost above limit ' .. i)
            end
        end
    end
    local tb = op ~= 'release' and #limits == 1 and limits[1].alg == TB and limits[1]
    local take = op == 'take' and cost > 0
    if nk == 1 then return one(KEYS[1], op, limits, tb, cost, take, osec, ons) end
    -- each key apart: an error on one (a key of another type: WRONGTYPE) is that key's
    -- reply, and the keys before it, already decided and written, keep their replies
    local out = {}
    for i = 1, nk do
        local ok, res = pcall(one, KEYS[i], op, limits, tb, cost, take, osec, ons)
        if ok then
            out[i] = res
        else
            out[i] = redis.error_reply(type(res) == 'table' and res.err or
                                       'ERR sluice: ' .. tostring(res))
        end
    end
    return out
end
