"""The Lua scripts of RedisStreamStorage. Each runs atomically on the server, so nothing comes
between a check and the write it guards.

Beside the stream are two keys: the writer's lease, and its fencing token, the epoch, which only
grows and never expires (``_redis_lease.py``). Every entry of the stream carries its writer's id
(``w``) and epoch (``e``). A refusal comes back as an error that begins ``YOINKFENCED`` (a newer
epoch exists, or the epoch key is gone) or ``YOINKLEASE`` (another writer holds the lease).
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "APPEND", "RELEASE", "RENEW"]

# The newest epoch the stream's last entry carries, or 0 (a Lua chunk shared by the scripts below).
_LAST_EPOCH = """
local function last_entry(stream)
  local entry = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if not entry then
    return '', 0, nil
  end
  local fields, epoch, writer = entry[2], 0, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then epoch = tonumber(fields[i + 1]) or 0 end
    if fields[i] == 'w' then writer = fields[i + 1] end
  end
  return entry[1], epoch, writer
end
"""
# KEYS: the stream, the lease, the epoch. ARGV: writer, lease ms, epoch, first block number, blocks...
# Refused when the epoch key is gone, holds another epoch, or the stream's last entry was written with a
# newer epoch or with this one by another writer (an epoch issued twice after the key was lost).
APPEND = (
    _LAST_EPOCH
    + """
local current = redis.call('GET', KEYS[3])
if not current then
  return redis.error_reply('YOINKFENCED lost')
end
if tonumber(current) ~= tonumber(ARGV[3]) then
  return redis.error_reply('YOINKFENCED ' .. current)
end
local _, written, by = last_entry(KEYS[1])
if written > tonumber(ARGV[3]) then
  return redis.error_reply('YOINKFENCED ' .. written)
end
if written == tonumber(ARGV[3]) and by ~= ARGV[1] then
  return redis.error_reply('YOINKFENCED shared:' .. tostring(by))
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return redis.error_reply('YOINKLEASE ' .. holder)
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local b = tonumber(ARGV[4])
for i = 5, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'w', ARGV[1], 'e', ARGV[3], 'b', b, 'd', ARGV[i])
  b = b + 1
end
return #ARGV - 4
"""
)
# KEYS: the lease, the epoch, the stream. ARGV: writer, lease ms, and what the first read() saw: the
# epoch and the last entry's id ('' and '' if it never read). Returns {holder, ms left, epoch}, epoch 0
# if the lease is held by another; or {'', 0, -1, epoch now, last id now} if the journal moved on since
# that read. The epoch issued is above the key's and above every entry's, should the key have been lost.
ACQUIRE = (
    _LAST_EPOCH
    + """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return {holder, redis.call('PTTL', KEYS[1]), 0}
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local last, written = last_entry(KEYS[3])
if ARGV[3] ~= '' and (current > tonumber(ARGV[3]) or last ~= ARGV[4]) then
  return {'', 0, -1, current, last}
end
local epoch = math.max(current, written) + 1
redis.call('SET', KEYS[2], epoch)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {ARGV[1], tonumber(ARGV[2]), epoch}
"""
)
# KEYS: the lease, the epoch. ARGV: writer, lease ms, epoch.
# 1 renewed, 0 held by another, -1 a newer epoch exists, -2 the epoch key is gone.
RENEW = """
local current = redis.call('GET', KEYS[2])
if not current then
  return -2
end
if tonumber(current) ~= tonumber(ARGV[3]) then
  return -1
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: the lease. ARGV: writer. Deleted only if this writer holds it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
