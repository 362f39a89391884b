"""What a RedisStreamStorage keeps in Redis: the keys of a journal, the blocks its entries hold, and
the Lua scripts that change them. Each script runs atomically on the server, so nothing comes between
a check and the write it guards.

Beside the stream are two keys: the writer's lease, and its fencing token, the epoch, which only
grows and never expires (``_redis_lease.py``). Every entry of the stream carries its writer's id
(``w``), its epoch (``e``), the block's number in that writer's sequence (``b``; none in a
compaction's snapshot) and the block (``d``). Compaction (``_redis_compaction.py``) adds three:
the next generation of the journal while it is written, the token of the compaction writing it,
and the count of compactions (the generation); and it keeps each journal it replaced for a while
under a name of its own. A
refusal comes back as an error that begins ``YOINKFENCED`` (a newer epoch exists, or the epoch key
is gone), ``YOINKLEASE`` (another writer holds the lease) or ``YOINKSTAGE`` (the next generation is
gone, cut short or another compaction's). A script checks everything before it changes anything:
Redis does not undo what a script did before an error.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "ACQUIRE",
    "APPEND",
    "BEGIN",
    "CARRY",
    "DISCARD",
    "RELEASE",
    "RENEW",
    "STAGE",
    "SWITCH",
    "Keys",
    "blocks",
]


class Keys:
    """The keys of the journal in stream ``stream``. Those beside it share its Redis Cluster slot:
    they are named ``{<stream>}:...``, or ``<stream>:...`` when the name has a hash tag of its own."""

    def __init__(self, stream: str) -> None:
        base = stream if _has_hash_tag(stream) else f"{{{stream}}}"
        self.stream = stream
        self.lease = f"{base}:lease"  # the writer's lease: its id, expiring
        self.epoch = f"{base}:epoch"  # the newest fencing epoch, which never expires
        self.next = f"{base}:next"  # the next generation, while a compaction writes it
        self.next_owner = f"{base}:next:owner"  # the token of that compaction; 'done:<token>' once in
        self.generation = f"{base}:generation"  # the number of compactions (none: never compacted)
        self._base = base

    def retired(self, generation: int) -> str:
        """Where a compaction moves generation ``generation`` of the journal, for reads under way."""
        return f"{self._base}:old:{generation}"


def _has_hash_tag(key: str) -> bool:
    opening = key.find("{")
    return opening >= 0 and key.find("}", opening + 2) > 0


def blocks(data: bytes, size: int) -> Iterator[bytes]:
    """Cut ``data`` (whole lines) into blocks of whole lines of about ``size`` bytes, an entry each."""
    start = 0
    while len(data) - start > size:
        cut = data.find(b"\n", start + size - 1) + 1  # a line longer than size is a block of its own
        if cut == 0:
            break
        yield data[start:cut]
        start = cut
    if start < len(data):
        yield data[start:]


# Lua chunks shared by the scripts below. last_entry: the id, the epoch (or 0), the writer and the
# block number of a stream's last entry. fence: nil if this writer may write, else why not:
# 'YOINKFENCED ...' when the epoch key is gone, holds another epoch, or the stream's last entry was
# written with a newer epoch or with this one by another writer (an epoch issued twice after the key
# was lost); 'YOINKLEASE <holder>' when another writer holds the lease.
_FENCE = """
local function last_entry(stream)
  local entry = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if not entry then
    return '', 0, nil, nil
  end
  local fields, epoch, writer, block = entry[2], 0, nil, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then epoch = tonumber(fields[i + 1]) or 0 end
    if fields[i] == 'w' then writer = fields[i + 1] end
    if fields[i] == 'b' then block = fields[i + 1] end
  end
  return entry[1], epoch, writer, block
end
local function fence(stream, lease, epoch_key, writer, epoch)
  local current = redis.call('GET', epoch_key)
  if not current then
    return 'YOINKFENCED lost'
  end
  if tonumber(current) ~= tonumber(epoch) then
    return 'YOINKFENCED ' .. current
  end
  local _, written, by = last_entry(stream)
  if written > tonumber(epoch) then
    return 'YOINKFENCED ' .. written
  end
  if written == tonumber(epoch) and by ~= writer then
    return 'YOINKFENCED shared:' .. tostring(by)
  end
  local holder = redis.call('GET', lease)
  if holder and holder ~= writer then
    return 'YOINKLEASE ' .. holder
  end
  return nil
end
-- Renew the lease (fence() found it free or this writer's) once every check has passed.
local function renew(lease, writer, ms)
  redis.call('SET', lease, writer, 'PX', ms)
end
local function xadd_blocks(stream, writer, epoch, first, argv, from)
  local b = tonumber(first)
  for i = from, #argv do
    redis.call('XADD', stream, '*', 'w', writer, 'e', epoch, 'b', b, 'd', argv[i])
    b = b + 1
  end
  return #argv - from + 1
end
"""
# KEYS: the stream, the lease, the epoch. ARGV: writer, lease ms, epoch, first block number, blocks...
APPEND = (
    _FENCE
    + """
local refused = fence(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3])
if refused then
  return redis.error_reply(refused)
end
renew(KEYS[2], ARGV[1], ARGV[2])
return xadd_blocks(KEYS[1], ARGV[1], ARGV[3], ARGV[4], ARGV, 5)
"""
)
# KEYS: the lease, the epoch, the stream, the next generation, its owner. ARGV: writer, lease ms, and
# what the first read() saw: the epoch and the last entry's id ('' and '' if it never read). Returns
# {holder, ms left, epoch}, epoch 0 if the lease is held by another; or {'', 0, -1, epoch now, last id
# now} if the journal moved on since that read. The epoch issued is above the key's and above every
# entry's, should the key have been lost. A next generation left by an earlier writer (one that
# crashed or was paused part-way through a compaction) is deleted: its writer is fenced out now.
ACQUIRE = (
    _FENCE
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
redis.call('UNLINK', KEYS[4], KEYS[5])
return {ARGV[1], tonumber(ARGV[2]), epoch}
"""
)
# Compaction writes the new journal into a stream of its own, the next generation, in as many calls
# of STAGE as it takes, while flushes go on appending to the journal; CARRY copies what they
# appended after the cut (BEGIN's last entry) to the next generation, in as many calls as it takes;
# then SWITCH renames the journal away (it expires after a while, for reads under way) and the next
# generation into its place, at once, once nothing of the journal is left uncarried. The next
# generation's owner key holds the token of the compaction writing it; SWITCH leaves 'done:<token>'
# there, so that a SWITCH retried after a lost reply knows it went through. A refusal that is
# neither a lease's nor an epoch's begins 'YOINKSTAGE'.
#
# KEYS: the journal, the lease, the epoch, the next generation, its owner, the generation counter.
# ARGV: writer, lease ms, epoch, token. Fenced like APPEND; clears any next generation and claims it.
# Returns the generation number (0 for a journal never compacted) and the id of the journal's last
# entry ('' if it has none): the cut, after which entries are carried into the next generation.
BEGIN = (
    _FENCE
    + """
local refused = fence(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3])
if refused then
  return redis.error_reply(refused)
end
renew(KEYS[2], ARGV[1], ARGV[2])
redis.call('UNLINK', KEYS[4])
redis.call('SET', KEYS[5], ARGV[4])
local cut = last_entry(KEYS[1])
return {tonumber(redis.call('GET', KEYS[6]) or '0'), cut}
"""
)
# The next generation's entries have ids of their own: the snapshot's are 0-1, 0-2, ... and each
# entry carried from the journal keeps its id there (a real one, above 0-n), so that the next
# generation itself says how far the compaction got: a STAGE or a CARRY retried after its answer was
# lost finds its work done, and adds nothing twice.
_NEXT = """
local function carried(next_stream)
  local last = last_entry(next_stream)
  return last ~= '' and string.sub(last, 1, 2) ~= '0-'
end
"""
# KEYS: the next generation, the lease, the epoch, its owner. ARGV: writer, lease ms, epoch, token,
# how many blocks were staged before these, blocks... Fenced like APPEND, and refused unless the
# token still owns it and holds those blocks. Returns how many blocks it added (0 for a retry of
# blocks that are there). The snapshot's entries carry no block number: they are no flush's, and
# the numbers of the entries carried after them stay the writer's sequence.
STAGE = (
    _FENCE
    + _NEXT
    + """
local refused = fence(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3])
if refused then
  return redis.error_reply(refused)
end
if redis.call('GET', KEYS[4]) ~= ARGV[4] then
  return redis.error_reply('YOINKSTAGE taken')
end
local before, count = tonumber(ARGV[5]), #ARGV - 5
local last = last_entry(KEYS[1])
if last == '0-' .. (before + count) then
  return 0
end
if carried(KEYS[1]) or last ~= (before == 0 and '' or '0-' .. before) then
  return redis.error_reply('YOINKSTAGE incomplete')
end
renew(KEYS[2], ARGV[1], ARGV[2])
for i = 1, count do
  redis.call('XADD', KEYS[1], '0-' .. (before + i), 'w', ARGV[1], 'e', ARGV[3], 'd', ARGV[5 + i])
end
return count
"""
)
# KEYS: the journal, the lease, the epoch, the next generation, its owner. ARGV: writer, lease ms,
# epoch, token, the cut ('' for an empty journal), how many bytes of blocks to carry at most (it
# stops after the entry that reaches them: one entry at least). Fenced like APPEND on the journal,
# and refused unless the token still owns the next generation. Copies the journal's entries after
# the cut, or after the last one already carried, to the next generation under their ids, fields
# and all, reading one at a time (an entry may be far larger than others: a long line is a block of
# its own). Returns how many it copied, and 1 if it stopped at the bytes with more perhaps left.
CARRY = (
    _FENCE
    + _NEXT
    + """
local refused = fence(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3])
if refused then
  return redis.error_reply(refused)
end
if redis.call('GET', KEYS[5]) ~= ARGV[4] then
  return redis.error_reply('YOINKSTAGE taken')
end
renew(KEYS[2], ARGV[1], ARGV[2])
local from = ARGV[5]
if carried(KEYS[4]) then
  from = last_entry(KEYS[4])
end
local start, budget, copied, size = from == '' and '-' or '(' .. from, tonumber(ARGV[6]), 0, 0
while size < budget do
  local entry = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1)[1]
  if not entry then
    return {copied, 0}
  end
  local fields = entry[2]
  redis.call('XADD', KEYS[4], entry[1], unpack(fields))
  for i = 2, #fields, 2 do
    size = size + #fields[i]
  end
  copied, start = copied + 1, '(' .. entry[1]
end
return {copied, 1}
"""
)
# KEYS: the journal, the lease, the epoch, the next generation, its owner, the generation counter, the
# name the journal retires under. ARGV: writer, lease ms, epoch, token, the generation BEGIN returned,
# how many blocks were staged, ms the retired journal is kept, the cut. Fenced like APPEND on the
# journal; refused unless the token still owns the next generation, and it ends with the journal's
# last entry, carried (or, if nothing was appended after the cut, with the last block staged).
# Returns 1, or 0 if this token's switch had already gone through.
SWITCH = (
    _FENCE
    + _NEXT
    + """
local refused = fence(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3])
if refused then
  return redis.error_reply(refused)
end
if redis.call('GET', KEYS[5]) == 'done:' .. ARGV[4] then
  return 0
end
if redis.call('GET', KEYS[5]) ~= ARGV[4] then
  return redis.error_reply('YOINKSTAGE taken')
end
local journal_ends, next_ends = last_entry(KEYS[1]), last_entry(KEYS[4])
local staged = tonumber(ARGV[6])
if journal_ends == ARGV[8] then
  journal_ends = staged == 0 and '' or '0-' .. staged
end
local last_staged = '0-' .. staged
local staged_all = staged == 0 or redis.call('XRANGE', KEYS[4], last_staged, last_staged)[1]
if next_ends ~= journal_ends or not staged_all then
  return redis.error_reply('YOINKSTAGE incomplete')
end
renew(KEYS[2], ARGV[1], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[7])
  redis.call('PEXPIRE', KEYS[7], ARGV[7])
end
if next_ends ~= '' then
  redis.call('RENAME', KEYS[4], KEYS[1])
end
redis.call('SET', KEYS[6], tonumber(ARGV[5]) + 1)
redis.call('SET', KEYS[5], 'done:' .. ARGV[4])
return 1
"""
)
# KEYS: the next generation, its owner. ARGV: token. Deletes the next generation if the token owns it
# (1); 2 if the token's switch went through, 0 if another compaction or writer has taken over since.
DISCARD = """
local owner = redis.call('GET', KEYS[2])
if owner == ARGV[1] then
  redis.call('UNLINK', KEYS[1])
  redis.call('DEL', KEYS[2])
  return 1
end
if owner == 'done:' .. ARGV[1] then
  return 2
end
return 0
"""
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
