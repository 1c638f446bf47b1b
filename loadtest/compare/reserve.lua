-- Check-and-reserve for Redis, the equivalent of one allotd Reserve (one line, qty, TTL).
-- Positions are hashes pos:<index> {on_hand, reserved, safety}, index = sku * nodes + node.
--
-- ARGV[1] a random 12-digit number from redis-benchmark (__rand_int__, -r 1000000000)
-- ARGV[2] qty
-- ARGV[3] positions in the data set (skus * nodes)
-- ARGV[4] hot positions (hot_skus * nodes: SKUs 0..hot_skus-1 at every node); 0 = uniform
-- ARGV[5] hot share in per mille (900 = 90 % of calls on the hot positions)
-- ARGV[6] TTL in ms
--
-- redis-benchmark can only draw uniform random numbers, so the position is derived from the
-- number here: its last three digits pick hot or not, the rest picks the position. This keeps
-- one benchmark process (one latency histogram) per case; the cost is a few Lua arithmetic
-- operations. Keys are computed rather than passed in KEYS, which is fine on a standalone
-- Redis (not in a cluster).
--
-- Returns the new reservation id, or 0 when the position lacks available units.
local r = tonumber(ARGV[1])
local qty = tonumber(ARGV[2])
local positions = tonumber(ARGV[3])
local hot = tonumber(ARGV[4])
local hot_per_mille = tonumber(ARGV[5])
local ttl_ms = tonumber(ARGV[6])

-- As allot-load --hot-skus picks: the hot share uniformly over the hot positions, the rest
-- uniformly over the other positions (all hot when the hot set is everything).
local pick = math.floor(r / 1000)
local position
if hot == 0 then
  position = pick % positions
elseif hot >= positions or (r % 1000) < hot_per_mille then
  position = pick % hot
else
  position = hot + pick % (positions - hot)
end
local key = 'pos:' .. position

local p = redis.call('HMGET', key, 'on_hand', 'reserved', 'safety')
if not p[1] then
  return redis.error_reply('NOT_FOUND ' .. key)
end
if tonumber(p[1]) - tonumber(p[2]) - tonumber(p[3]) < qty then
  return 0
end
redis.call('HINCRBY', key, 'reserved', qty)

-- The durable reservation record, as allotd keeps one: an id, the position, the quantity and
-- the expiry, plus an expiry index a sweeper would read (no sweeper runs: the TTL outlasts a run).
local id = redis.call('INCR', 'reservation:seq')
local now = redis.call('TIME')
local expires_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + ttl_ms
redis.call('HSET', 'reservation:' .. id, 'position', key, 'qty', qty, 'expires_ms', expires_ms)
redis.call('ZADD', 'reservation:expiry', expires_ms, id)
return id
