"""The Redis quota store's Lua scripts, one per store call.

Key layout, every key of a partition under the hash tag ``{partition}`` so that one script
touches one cluster slot (``S`` is a scope's base key, ``tg:q:{ten_1}:key:key_9``)::

    S:rpm                 hash  second -> requests admitted in that second, and two more
                                fields: sum (of every bucket present) and old (the oldest
                                bucket's second), so that an admission reads two fields, not
                                the whole window, until the oldest bucket leaves it
    S:tpm                 hash  second -> tokens reserved (then settled) in that second; sum,
                                old as above
    S:lease               zset  request id scored by its lease expiry (ms); members stay
                                RECORD_MARGIN_MS past it to count open reservations
    S:day:YYYY-MM-DD      int   tokens of that UTC day
    S:mtok:YYYY-MM        int   tokens of that UTC month
    S:mspend:YYYY-MM      int   nano-USD of that UTC month
    tg:q:{P}:res:<id>     hash  the reservation record: bucket second (b), day (d),
                                month (m), tokens (t), spend (s), scope count (n), scope
                                base keys (k1..kn); expires RECORD_MARGIN_MS after the lease
    tg:q:{P}:tomb:<id>    str   the request id was settled or released: refuse it from now on

Keys passed in ``KEYS`` are the partition base and the scope bases; the scripts derive the
rest (the day and month come from ``TIME``), all under the same hash tag. Every number is an
integer (Lua doubles hold them exactly below 2^53) and is formatted with ``%d`` before it
goes back to Redis.
"""

from __future__ import annotations

__all__ = ["ADMIT", "PRELUDE", "SETTLE", "USAGE"]

#: Helpers shared by every script: time from the server, calendar periods, bucket windows.
PRELUDE = r"""
local DAY_MS = 86400000

local function int(x)
  return string.format('%d', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's civil_from_days).
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor(
    (doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- A date to days since 1970-01-01 (days_from_civil).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The UTC day and month of now, and the ms until the next day and the next month start.
local function periods(now)
  local days = math.floor(now / DAY_MS)
  local y, m, d = civil(days)
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return string.format('%04d-%02d-%02d', y, m, d), string.format('%04d-%02d', y, m),
    (days + 1) * DAY_MS - now, days_from_civil(ny, nm, 1) * DAY_MS - now
end

-- The total of a bucket hash from second lo on, and its non-empty buckets oldest first
-- (the sum and old fields are no buckets).
local function read_window(key, lo)
  local raw = redis.call('HGETALL', key)
  local total, live = 0, {}
  for i = 1, #raw, 2 do
    local sec, value = tonumber(raw[i]), tonumber(raw[i + 1])
    if sec ~= nil and sec >= lo then
      total = total + value
      if value > 0 then live[#live + 1] = {sec, value} end
    end
  end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  return total, live
end

-- The total of a bucket hash from second lo on, and its oldest bucket's second (nil when
-- empty), from its sum and old fields; once the oldest bucket has left the window (about
-- once a second under load), the expired buckets are deleted and both fields made again.
local function window_total(key, lo)
  local meta = redis.call('HMGET', key, 'sum', 'old')
  local sum, old = tonumber(meta[1]), tonumber(meta[2])
  if sum ~= nil and (old == nil or old >= lo) then return sum, old end
  local raw = redis.call('HGETALL', key)
  local total, oldest, expired = 0, nil, {}
  for i = 1, #raw, 2 do
    local sec = tonumber(raw[i])
    if sec ~= nil then
      if sec < lo then
        expired[#expired + 1] = raw[i]
      else
        total = total + tonumber(raw[i + 1])
        if oldest == nil or sec < oldest then oldest = sec end
      end
    end
  end
  if #expired > 0 then redis.call('HDEL', key, unpack(expired)) end
  if oldest == nil then
    redis.call('HDEL', key, 'old')
    if #raw > 0 then redis.call('HSET', key, 'sum', '0') end
  else
    redis.call('HSET', key, 'sum', int(total), 'old', int(oldest))
  end
  return total, oldest
end

-- Add delta to bucket sec of a bucket hash (and to its sum; sec becomes old if none is).
local function add_bucket(key, sec, delta)
  redis.call('HINCRBY', key, int(sec), int(delta))
  redis.call('HINCRBY', key, 'sum', int(delta))
  redis.call('HSETNX', key, 'old', int(sec))
end

-- ms until `need` units have left the window, or the whole window if they never can.
local function free_after(live, need, window, now)
  local freed = 0
  for _, bucket in ipairs(live) do
    freed = freed + bucket[2]
    if freed >= need then return (bucket[1] + window) * 1000 - now end
  end
  return window * 1000
end

local function incr_existing(key, delta)
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, int(delta)) end
end

local function incr_until(key, delta, ttl_ms)
  redis.call('INCRBY', key, int(delta))
  redis.call('PEXPIRE', key, int(ttl_ms))
end
"""

#: KEYS: partition base, then one base per scope. ARGV: request id, tokens, spend, lease ms,
#: window s, record margin ms, then per scope rpm, tpm, max_concurrency, daily_tokens,
#: monthly_tokens, monthly_spend (-1 for unlimited). Returns admitted (0/1), dimension code
#: (0 none, 1..6 in check order), scope index (1-based), retry ms, then limit, remaining and
#: reset ms for requests and for tokens (-1 for none).
ADMIT = (
    PRELUDE
    + r"""
local base = KEYS[1]
local rid = ARGV[1]
local tokens = tonumber(ARGV[2])
local spend = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local margin_ms = tonumber(ARGV[6])

local now = now_ms()
local sec = math.floor(now / 1000)
local lo = sec - window + 1
local day, month, to_day, to_month = periods(now)

local scopes = {}
for i = 2, #KEYS do
  local k = KEYS[i]
  local a = 6 + (i - 2) * 6
  local s = {
    key = k,
    rpm = tonumber(ARGV[a + 1]),
    tpm = tonumber(ARGV[a + 2]),
    conc = tonumber(ARGV[a + 3]),
    daily = tonumber(ARGV[a + 4]),
    monthly = tonumber(ARGV[a + 5]),
    spend_limit = tonumber(ARGV[a + 6]),
  }
  s.req, s.req_old = window_total(k .. ':rpm', lo)
  s.tok, s.tok_old = window_total(k .. ':tpm', lo)
  redis.call('ZREMRANGEBYSCORE', k .. ':lease', '-inf', int(now - margin_ms))
  s.live = redis.call('ZCOUNT', k .. ':lease', '(' .. int(now), '+inf')
  s.day_tokens = tonumber(redis.call('GET', k .. ':day:' .. day)) or 0
  s.month_tokens = tonumber(redis.call('GET', k .. ':mtok:' .. month)) or 0
  s.month_spend = tonumber(redis.call('GET', k .. ':mspend:' .. month)) or 0
  scopes[#scopes + 1] = s
end

-- ms until a retry can pass limit `dim` of scope `s`, or nil when it passes now.
local function refusal(s, dim)
  if dim == 1 then
    if s.spend_limit >= 0 and s.month_spend + spend > s.spend_limit then return to_month end
  elseif dim == 2 then
    if s.monthly >= 0 and s.month_tokens + tokens > s.monthly then return to_month end
  elseif dim == 3 then
    if s.daily >= 0 and s.day_tokens + tokens > s.daily then return to_day end
  elseif dim == 4 then
    if s.conc >= 0 and s.live + 1 > s.conc then
      local wait = 1000
      local first = redis.call('ZRANGEBYSCORE', s.key .. ':lease', '(' .. int(now), '+inf',
        'WITHSCORES', 'LIMIT', '0', '1')
      if #first > 0 then wait = math.min(wait, tonumber(first[2]) - now) end
      return wait
    end
  elseif dim == 5 then
    if s.rpm >= 0 and s.req + 1 > s.rpm then
      local _, live = read_window(s.key .. ':rpm', lo)
      return free_after(live, s.req + 1 - s.rpm, window, now)
    end
  elseif s.tpm >= 0 and s.tok + tokens > s.tpm then
    if tokens > s.tpm then return window * 1000 end
    local _, live = read_window(s.key .. ':tpm', lo)
    return free_after(live, s.tok + tokens - s.tpm, window, now)
  end
  return nil
end

local record = base .. ':res:' .. rid
local admitted, dim, idx, retry = 0, 0, 0, -1
if redis.call('EXISTS', record, base .. ':tomb:' .. rid) == 0 then
  for d = 1, 6 do
    for i, s in ipairs(scopes) do
      local wait = refusal(s, d)
      if wait then
        dim, idx, retry = d, i, wait
        break
      end
    end
    if dim ~= 0 then break end
  end
  if dim == 0 then admitted = 1 end
end

if admitted == 1 then
  local fields = {'b', int(sec), 'd', day, 'm', month, 't', int(tokens), 's', int(spend),
    'n', int(#scopes)}
  local window_ttl = int((window + 1) * 1000)
  local hold_ms = lease_ms + margin_ms
  for i, s in ipairs(scopes) do
    local k = s.key
    add_bucket(k .. ':rpm', sec, 1)
    redis.call('PEXPIRE', k .. ':rpm', window_ttl)
    add_bucket(k .. ':tpm', sec, tokens)
    redis.call('PEXPIRE', k .. ':tpm', window_ttl)
    redis.call('ZADD', k .. ':lease', int(now + lease_ms), rid)
    if redis.call('PTTL', k .. ':lease') < hold_ms then
      redis.call('PEXPIRE', k .. ':lease', int(hold_ms))
    end
    incr_until(k .. ':day:' .. day, tokens, to_day + 2 * DAY_MS)
    incr_until(k .. ':mtok:' .. month, tokens, to_month + 35 * DAY_MS)
    incr_until(k .. ':mspend:' .. month, spend, to_month + 35 * DAY_MS)
    fields[#fields + 1] = 'k' .. i
    fields[#fields + 1] = k
  end
  redis.call('HSET', record, unpack(fields))
  redis.call('PEXPIRE', record, int(hold_ms))
end

-- Header figures from the scope with the least left of a limit (after this request).
local function headers(limit, used, oldest_of, take)
  local best, best_limit, best_left = nil, -1, -1
  for _, s in ipairs(scopes) do
    if s[limit] >= 0 then
      local left = s[limit] - s[used] - take
      if left < 0 then left = 0 end
      if best == nil or left < best_left then best, best_limit, best_left = s, s[limit], left end
    end
  end
  if best == nil then return -1, -1, -1 end
  local oldest = best[oldest_of]
  if oldest == nil and take > 0 then oldest = sec end
  local reset = 0
  if oldest then reset = (oldest + window) * 1000 - now end
  return best_limit, best_left, reset
end

local req_limit, req_left, req_reset = headers('rpm', 'req', 'req_old', admitted)
local tok_limit, tok_left, tok_reset = headers('tpm', 'tok', 'tok_old', admitted * tokens)
return {admitted, dim, idx, retry, req_limit, req_left, req_reset, tok_limit, tok_left,
  tok_reset}
"""
)

#: KEYS: partition base. ARGV: request id, real tokens, real spend, window s, tombstone TTL s.
#: Returns 1 when an open reservation was settled, else 0.
SETTLE = (
    PRELUDE
    + r"""
local base = KEYS[1]
local rid = ARGV[1]
local tokens = tonumber(ARGV[2])
local spend = tonumber(ARGV[3])
local window = tonumber(ARGV[4])

local now = now_ms()
local record = base .. ':res:' .. rid
redis.call('SET', base .. ':tomb:' .. rid, '1', 'EX', ARGV[5])
local raw = redis.call('HGETALL', record)
if #raw == 0 then return 0 end
redis.call('DEL', record)

local f = {}
for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
local token_delta = tokens - tonumber(f.t)
local spend_delta = spend - tonumber(f.s)
local in_window = tonumber(f.b) >= math.floor(now / 1000) - window + 1
for i = 1, tonumber(f.n) do
  local k = f['k' .. i]
  redis.call('ZREM', k .. ':lease', rid)
  if token_delta ~= 0 then
    if in_window and redis.call('HEXISTS', k .. ':tpm', f.b) == 1 then
      redis.call('HINCRBY', k .. ':tpm', f.b, int(token_delta))
      redis.call('HINCRBY', k .. ':tpm', 'sum', int(token_delta))
    end
    incr_existing(k .. ':day:' .. f.d, token_delta)
    incr_existing(k .. ':mtok:' .. f.m, token_delta)
  end
  if spend_delta ~= 0 then incr_existing(k .. ':mspend:' .. f.m, spend_delta) end
end
return 1
"""
)

#: KEYS: a scope's base. ARGV: window s, record margin ms. Returns requests and tokens in the
#: window, live leases, today's tokens, this month's tokens and spend, open reservations.
USAGE = (
    PRELUDE
    + r"""
local k = KEYS[1]
local window = tonumber(ARGV[1])
local margin_ms = tonumber(ARGV[2])

local now = now_ms()
local lo = math.floor(now / 1000) - window + 1
local day, month = periods(now)
local requests = read_window(k .. ':rpm', lo)
local tokens = read_window(k .. ':tpm', lo)
return {
  requests,
  tokens,
  redis.call('ZCOUNT', k .. ':lease', '(' .. int(now), '+inf'),
  tonumber(redis.call('GET', k .. ':day:' .. day)) or 0,
  tonumber(redis.call('GET', k .. ':mtok:' .. month)) or 0,
  tonumber(redis.call('GET', k .. ':mspend:' .. month)) or 0,
  redis.call('ZCOUNT', k .. ':lease', '(' .. int(now - margin_ms), '+inf'),
}
"""
)
