-- rr.journal: the journal of a run in progress, so that an engine killed mid-run (a cancelled
-- CI job, a dropped SSH session, the OOM killer, a reboot) never leaves a service half done
-- without anyone knowing.
--
-- One small JSON file, <state root>/run.journal, rewritten atomically (temp file, fsync,
-- rename) at every phase change of every service in flight: who ran (run id, PID and its start
-- time, boot id, user, argv, services file), the plan's order and what finished, and per
-- service in flight its phase, its deploy record, whether its migration started or finished,
-- whether it passed its post-check on the new version, and the processes it started. A run
-- that ends (PLAN_END) removes it; a journal left behind is an interrupted run.
--
-- Who reads it: every acting entry point takes the run lock first; a journal found while the
-- lock is held by us belongs to a run that died (its lock died with it). Read-only entry points
-- (status, the dry run) take no lock and ask whether the writer is still alive (its PID with
-- the same start time, on the same boot).
local fs = require("rr.fs")
local hostfs = require("rr.hostfs")
local cjson = require("cjson")
local state = require("rr.state")

local journal = {}
journal.__index = journal

local VERSION = 1
local json = cjson.new()

local function read_line(path)
  local data = fs.read(path)
  return data and data:match("^%s*(.-)%s*$") or nil
end

-- This machine's name: a journal on a host names the engine host that wrote it.
function journal.hostname()
  return read_line("/proc/sys/kernel/hostname") or "?"
end

function journal.boot_id()
  return read_line("/proc/sys/kernel/random/boot_id") or "unknown"
end

-- The start time of a process (clock ticks since boot, field 22 of /proc/PID/stat): a PID with
-- another start time is another process.
function journal.start_time(pid)
  local data = fs.read(("/proc/%d/stat"):format(pid))
  if not data then return nil end
  -- the command name may hold spaces and parentheses: fields count from the last ')'
  local rest = data:match("^.*%)%s+(.*)$")
  if not rest then return nil end
  -- a zombie has ended: only its parent has not reaped it yet
  if rest:match("^Z") then return nil end
  local i = 3
  for field in rest:gmatch("%S+") do
    if i == 22 then return field end
    i = i + 1
  end
  return nil
end

-- Is the process that wrote `who` ({pid, pid_start, boot_id}) still running?
function journal.alive(who)
  if type(who) ~= "table" or not math.tointeger(who.pid) then return false end
  if who.boot_id and who.boot_id ~= journal.boot_id() then return false end
  local start = journal.start_time(who.pid)
  return start ~= nil and (who.pid_start == nil or start == who.pid_start)
end

local function encode(data)
  return json.encode(data)
end

-- journal.read(root) -> data | nil, message, CODE ("ENOENT": no journal; "EBADMSG": unreadable)
function journal.read(root, hfs)
  local path = state.journal_path(root)
  local text, err, code = (hfs or fs).read(path)
  if not text then return nil, err, code end
  local ok, data = pcall(json.decode, text)
  if not ok or type(data) ~= "table" or data.version ~= VERSION or type(data.services) ~= "table" then
    return nil, ("the run journal %s cannot be read"):format(path), "EBADMSG"
  end
  data.pid = math.tointeger(data.pid) or data.pid
  for _, s in pairs(data.services) do
    for _, c in ipairs(s.children or {}) do c.pid = math.tointeger(c.pid) or c.pid end
  end
  return data
end

-- journal.interrupted(root[, {locked = true}]) -> data | nil
-- The journal of a run that ended without finishing. locked: the caller holds the run lock, so
-- any journal there is a dead run's; otherwise its writer must be gone.
function journal.interrupted(root, opts)
  local data, err, code = journal.read(root, opts and opts.fs)
  if not data then
    if code == "EBADMSG" then
      -- a journal we cannot read is still a run that did not finish
      return { unreadable = err, services = {}, order = {}, done = {} }
    end
    return nil
  end
  -- a journal on another host was written by an engine elsewhere: only the lock tells
  if not (opts and opts.locked) and (opts and opts.fs and opts.fs.remote or journal.alive(data)) then return nil end
  return data
end

-- The children of a dead run's service that still run: { {pid =, what =}, ... }.
function journal.live_children(entry)
  local out = {}
  for _, c in ipairs(entry.children or {}) do
    if journal.alive(c) then out[#out + 1] = c end
  end
  return out
end

-- journal.resolve_command(data, how) -> the complete command that resolves the interrupted run
-- (how: "--recover" or "--abandon"), with the services file and --user as the run had them.
function journal.resolve_command(data, how)
  local quote = function(w)
    w = tostring(w)
    if w:match("^[%w%._/:@%%+=,-]+$") then return w end
    return "'" .. w:gsub("'", "'\\''") .. "'"
  end
  local parts = { "rrengine", "plans/rolling.lua", how }
  if data.services_file then parts[#parts + 1] = "--services"; parts[#parts + 1] = quote(data.services_file) end
  if data.user then parts[#parts + 1] = "--user" end
  return table.concat(parts, " ")
end

-- Names of the services in flight, in the plan's order (then any others, sorted).
function journal.in_flight(data)
  local names, seen = {}, {}
  for _, n in ipairs(data.order or {}) do
    if data.services[n] then names[#names + 1] = n; seen[n] = true end
  end
  local rest = {}
  for n in pairs(data.services) do if not seen[n] then rest[#rest + 1] = n end end
  table.sort(rest)
  for _, n in ipairs(rest) do names[#names + 1] = n end
  return names
end

-- journal.describe(data) -> lines: what an operator must know about an interrupted run.
function journal.describe(data)
  if data.unreadable then
    return { ("an earlier run did not finish, and %s"):format(data.unreadable),
      "resolve: look at the services by hand, then remove that file" }
  end
  local lines = { ("an earlier run was interrupted: run %s (pid %s, started %s%s)"):format(
    tostring(data.run), tostring(data.pid), tostring(data.started_at),
    data.boot_id ~= journal.boot_id() and ", before a reboot" or "") }
  for _, name in ipairs(journal.in_flight(data)) do
    local s = data.services[name]
    local detail = {}
    if s.deploy_record then detail[#detail + 1] = "deploy record " .. s.deploy_record end
    if s.migration then detail[#detail + 1] = "migration " .. s.migration end
    if s.verified then detail[#detail + 1] = "passed its post-check on the new version" end
    lines[#lines + 1] = ("  %s: left in phase %s%s"):format(name, tostring(s.phase),
      #detail > 0 and (" (" .. table.concat(detail, ", ") .. ")") or "")
    for _, c in ipairs(journal.live_children(s)) do
      lines[#lines + 1] = ("    still running from that run: pid %d (%s): nothing acts on %s until it has ended")
        :format(c.pid, tostring(c.what), name)
    end
  end
  if #journal.in_flight(data) == 0 then
    lines[#lines + 1] = "  no service was in flight"
  end
  local left = journal.not_started(data)
  if #left > 0 then
    lines[#lines + 1] = "  not started: " .. table.concat(left, ", ")
  end
  lines[#lines + 1] = "resolve: " .. journal.resolve_command(data, "--recover")
    .. "   (or, once fixed by hand: " .. journal.resolve_command(data, "--abandon") .. ")"
  return lines
end

-- The services of the plan that never started.
function journal.not_started(data)
  local seen, out = {}, {}
  for _, n in ipairs(data.done or {}) do seen[n] = true end
  for _, n in ipairs(data.failed or {}) do seen[n] = true end
  for _, n in ipairs(data.order or {}) do
    if not seen[n] and not data.services[n] then out[#out + 1] = n end
  end
  return out
end

-- The services of the plan that did not succeed (what --resume runs).
function journal.remaining(data)
  local done, out = {}, {}
  for _, n in ipairs(data.done or {}) do done[n] = true end
  for _, n in ipairs(data.order or {}) do
    if not done[n] then out[#out + 1] = n end
  end
  return out
end

-- journal.create(root, info) -> j | nil, message, CODE
-- info = { run =, argv =, services_file =, user =, order = {names}, kind = "rolling"|... }
function journal.create(root, info)
  local pid = fs.getpid()
  local self = setmetatable({
    root = root,
    fs = info.fs or hostfs.here(),
    path = state.journal_path(root),
    data = {
      version = VERSION, run = info.run, pid = pid, pid_start = journal.start_time(pid),
      boot_id = journal.boot_id(), user = info.user or false, argv = info.argv or {},
      services_file = info.services_file, started_at = os.date("!%Y-%m-%dT%H:%M:%SZ"),
      kind = info.kind or "rolling", order = info.order or {}, done = {}, failed = {}, services = {},
      host = info.host, engine_host = journal.hostname(),
    },
  }, journal)
  local ok, err, code = self:write()
  if not ok then return nil, err, code end
  return self
end

-- j:adopt(root, data) -> j: carries on the journal of an interrupted run (recovery): the same
-- record, now written by this process.
function journal.adopt(root, data, hfs)
  local pid = fs.getpid()
  data.pid, data.pid_start, data.boot_id = pid, journal.start_time(pid), journal.boot_id()
  data.done = data.done or {}
  data.order = data.order or {}
  return setmetatable({ root = root, fs = hfs or hostfs.here(), path = state.journal_path(root), data = data }, journal)
end

-- Written into the state root: its temp file is created O_EXCL|O_NOFOLLOW beside it, and a
-- run.journal that is a symlink is refused (`under`), never written through.
-- j:write([durable]): always atomic (a killed engine leaves the old journal or the new one);
-- fsynced unless `durable` is false. Only records whose loss after a power cut errs on the safe
-- side skip the fsync: a phase lost so makes recovery see less progress than there was, and it
-- then rolls back, never forward. Each fsync costs milliseconds per service.
function journal:write(durable)
  local under = state.under(self.root)
  under.mode = 384
  under.sync = durable ~= false
  local ok, err, code = self.fs.write_atomic(self.path, encode(self.data) .. "\n", under)
  if not ok then
    return nil, ("cannot write the run journal %s: %s"):format(self.path, tostring(err)), code
  end
  return true
end

-- Which records must survive a power cut: a deploy about to run, a migration started, the unit
-- about to be touched (apply), a rollback, a member taken out of rotation.
local DURABLE_PHASES = { apply = true, rollback = true, drain = true }
function journal.durable(fields)
  return fields.deploy_record ~= nil or fields.migration == "started" or fields.drained == true
    or DURABLE_PHASES[fields.phase] == true
end

-- j:update(service, fields): merges fields into the service's entry (creating it: the service
-- is now in flight) and rewrites the journal. A write that fails is reported once on stderr:
-- the restart goes on (its events still say what happened).
function journal:update(service, fields)
  local entry = self.data.services[service]
  if not entry then
    entry = {}
    self.data.services[service] = entry
  end
  for k, v in pairs(fields) do entry[k] = v end
  local ok, err = self:write(journal.durable(fields))
  if not ok and not self.failed then
    self.failed = true
    io.stderr:write("rrengine: ", err, "\n")
  end
end

-- j:child(service, pid, what) / j:child_done(service, pid): a process the service's flow
-- started (a migration, rsync), so that a later run knows it may still run.
function journal:child(service, pid, what)
  local entry = self.data.services[service] or {}
  local children = entry.children or {}
  children[#children + 1] = { pid = pid, pid_start = journal.start_time(pid), boot_id = journal.boot_id(), what = what }
  self:update(service, { children = children })
end

function journal:child_done(service, pid)
  local entry = self.data.services[service]
  if not entry or not entry.children then return end
  local kept = {}
  for _, c in ipairs(entry.children) do if c.pid ~= pid then kept[#kept + 1] = c end end
  self:update(service, { children = kept })
end

-- j:finished(service, succeeded): the service's flow ended (succeeded, or failed and was
-- rolled back or not touched): it is no longer in flight.
function journal:finished(service, succeeded)
  self.data.services[service] = nil
  local list = succeeded and self.data.done or self.data.failed
  if not list then list = {}; self.data.failed = list end
  list[#list + 1] = service
  self:write(false)
end

-- j:forget(service): a service resolved by recovery.
function journal:forget(service)
  self.data.services[service] = nil
  self:write(false)
end

-- j:close(): the run ended: the journal goes.
function journal:close()
  if not self.path then return true end
  local ok, err, code = self.fs.remove(self.path, state.under(self.root))
  if not ok and code ~= "ENOENT" then return nil, err, code end
  self.fs.fsync_dir(self.path:match("^(.*)/[^/]+$"))
  self.path = nil
  return true
end

-- journal.remove(root): forget an interrupted run (--abandon).
function journal.remove(root, hfs)
  local path = state.journal_path(root)
  local ok, err, code = (hfs or fs).remove(path, state.under(root))
  if not ok and code ~= "ENOENT" then return nil, err, code end
  return true
end

return journal
