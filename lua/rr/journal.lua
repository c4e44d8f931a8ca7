-- rr.journal: the journal of a run in progress, so that an engine killed mid-run (a cancelled
-- CI job, a dropped SSH session, the OOM killer, a reboot) never leaves a service half done
-- without anyone knowing.
--
-- One file, <state root>/run.journal, of JSON lines: a header (who ran: run id, PID and its
-- start time, boot id, user, argv, services file, the plan's order), then one record per change
-- (a service's fields, a service finished, a service forgotten, the run adopted by a recovery),
-- each appended with one write(). Reading replays them into one table: per service in flight
-- its phase, its deploy record, whether its migration started or finished, whether it passed
-- its post-check on the new version, and the processes it started. A run that ends (PLAN_END)
-- removes the file; a journal left behind is an interrupted run.
--
-- Why appends, not a rewrite of the whole state: a service changes phase about eight times, and
-- rewriting (temp file, rename) a journal that names every service costs a rename each time and
-- grows with the platform (N services x 8 rewrites of N entries). An append is one write(); a
-- kill leaves whole lines (one write() per line), and a power cut at most a torn last line,
-- which reading drops: the records that must survive a power cut are fsynced before the step
-- they announce (journal.durable).
--
-- Who reads it: every acting entry point takes the run lock first; a journal found while the
-- lock is held by us belongs to a run that died (its lock died with it). Read-only entry points
-- (status, the dry run) take no lock and ask whether the writer is still alive (its PID with
-- the same start time, on the same boot) when it ran on this machine (the header's engine_host);
-- a journal on a host written by an engine elsewhere cannot be asked: they say so
-- (journal.writer). A migration on a host is a transient unit there, named before it starts:
-- whether it still runs is asked of that host's manager.
local rr = require("rr")
local fs = require("rr.fs")
local hostfs = require("rr.hostfs")
local cjson = require("cjson")
local log = require("rr.log")
local state = require("rr.state")

local journal = {}
journal.__index = journal

local VERSION = 2
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

-- Header fields: the run; everything else in data is replayed from the records.
local HEADER = { "version", "run", "pid", "pid_start", "boot_id", "user", "argv", "services_file",
  "started_at", "kind", "order", "host", "engine_host" }

-- Replays the lines of a journal into data | nil. A last line without its newline was torn by a
-- power cut: what it said was not durable, so it is dropped; any other bad line is not.
local function replay(text)
  local lines = {}
  for line in text:gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
  local ok, head = pcall(json.decode, lines[1] or "")
  if not ok or type(head) ~= "table" or head.version ~= VERSION or head.record ~= "run" then return nil end
  local data = { done = {}, failed = {}, services = {} }
  for _, k in ipairs(HEADER) do data[k] = head[k] end
  data.order = type(data.order) == "table" and data.order or {}
  for i = 2, #lines do
    local good, r = pcall(json.decode, lines[i])
    if not good or type(r) ~= "table" then return nil end
    local name = r.service
    if r.record == "set" and type(name) == "string" and type(r.set) == "table" then
      local entry = data.services[name] or {}
      data.services[name] = entry
      for k, v in pairs(r.set) do
        if v == json.null then entry[k] = nil else entry[k] = v end
      end
    elseif r.record == "finished" and type(name) == "string" then
      data.services[name] = nil
      local list = r.ok and data.done or data.failed
      list[#list + 1] = name
    elseif r.record == "forget" and type(name) == "string" then
      data.services[name] = nil
    elseif r.record == "renew" and type(r.order) == "table" then
      data.run, data.order, data.done, data.failed = r.run, r.order, {}, {}
    elseif r.record == "weight" and type(name) == "string" and type(r.weight) == "table" then
      data.weights = data.weights or {}
      data.weights[name] = r.weight
    elseif r.record == "weight_restored" and type(name) == "string" then
      if data.weights then data.weights[name] = nil end
    elseif r.record == "adopt" then
      data.pid, data.pid_start, data.boot_id = r.pid, r.pid_start, r.boot_id
    else
      return nil
    end
  end
  return data
end

-- journal.read(root) -> data | nil, message, CODE ("ENOENT": no journal; "EBADMSG": unreadable)
function journal.read(root, hfs)
  local path = state.journal_path(root)
  local text, err, code = (hfs or fs).read(path)
  if not text then return nil, err, code end
  local data = replay(text)
  if not data then
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

-- journal.writer(data) -> "alive" | "dead" | "unknown", note: whether the run that wrote a
-- journal still runs, asked without its lock (status, the dry run). A journal written on this
-- machine (its engine_host; one without it is this machine's) is checked as journal.alive does.
-- One written by an engine on another machine cannot be: its PID means nothing here, so the answer
-- is "unknown" and the note says so, rather than calling a run that may be going on dead.
function journal.writer(data)
  if data.unreadable then return "dead", data.unreadable end
  if data.engine_host == nil or data.engine_host == journal.hostname() then
    if journal.alive(data) then
      return "alive", ("run %s is in progress (pid %s on this machine, started %s)"):format(tostring(data.run),
        tostring(data.pid), tostring(data.started_at))
    end
    return "dead", nil
  end
  return "unknown", ("written by an engine on %s, pid %s (run %s, started %s): cannot tell whether it still runs")
    :format(tostring(data.engine_host), tostring(data.pid), tostring(data.run), tostring(data.started_at))
end

-- journal.look(root[, hfs]) -> nil (no journal, or it cannot be read from here) | { data =,
-- writer = "alive" | "dead" | "unknown", note = }: a read-only look at the journal under root (on
-- hfs's host), for what status and the dry run show. An unreadable journal is a dead run's.
function journal.look(root, hfs)
  local data, err, code = journal.read(root, hfs)
  if not data then
    if code == "EBADMSG" then
      return { data = { unreadable = err, services = {}, order = {}, done = {} }, writer = "dead" }
    end
    return nil
  end
  local writer, note = journal.writer(data)
  return { data = data, writer = writer, note = note }
end

-- journal.look_lines(look[, host, root[, opts]]) -> lines: what an operator reads about it (opts
-- as journal.describe's). A dead run:
-- journal.describe's lines (named by its host); one whose writer is unknown: that, then what it
-- has in flight; a run in progress: one line.
function journal.look_lines(look, host, root, opts)
  local where = host and ("on host %s (%s): "):format(host, tostring(root)) or ""
  if look.writer == "alive" then
    return { where .. look.note }
  end
  local lines = journal.describe(look.data, opts)
  if look.writer == "unknown" then
    lines[1] = "a run journal " .. look.note
  end
  lines[1] = where .. lines[1]
  return lines
end

-- The children of a dead run's service that still run: { {pid =, what =} | {unit =, host =,
-- what =}, ... }. A process here is checked by its PID and start time; a transient unit on a
-- host (a remote migration) by opts.unit_alive(child) -> bool, which asks that host's manager
-- (journal.unit_alive_on). Without it such a unit counts as running: nothing is known to have
-- ended it.
function journal.live_children(entry, opts)
  local out = {}
  for _, c in ipairs(entry.children or {}) do
    if c.unit then
      if not (opts and opts.unit_alive) or opts.unit_alive(c) then out[#out + 1] = c end
    elseif journal.alive(c) then
      out[#out + 1] = c
    end
  end
  return out
end

-- journal.unit_alive_on(manager) -> fn(child) -> bool: whether a child transient unit is still
-- loaded and not inactive on manager's host (a unit that ended was collected: it is gone). A
-- manager that cannot answer counts it as running.
function journal.unit_alive_on(manager)
  return function(c)
    if not manager then return true end
    local u, _, code = manager:unit(c.unit)
    if not u then return code ~= "ENOENT" and code ~= "org.freedesktop.systemd1.NoSuchUnit" end
    local st = u:get("ActiveState")
    if st == nil then return true end
    return st ~= "inactive" and st ~= "failed"
  end
end

-- One child in words: "pid N (WHAT)" or "unit U on HOST (WHAT)".
function journal.child_text(c)
  if c.unit then return ("unit %s on %s (%s)"):format(c.unit, tostring(c.host), tostring(c.what)) end
  return ("pid %d (%s)"):format(c.pid, tostring(c.what))
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

-- journal.describe(data[, opts]) -> lines: what an operator must know about an interrupted run.
-- opts.unit_alive: as for journal.live_children.
function journal.describe(data, opts)
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
    if type(s.blue_green) == "table" then
      detail[#detail + 1] = s.switched and ("blue-green: traffic had switched from %s to %s"):format(
        tostring(s.blue_green.live), tostring(s.blue_green.idle))
        or ("blue-green: %s live, the release in %s"):format(tostring(s.blue_green.live), tostring(s.blue_green.idle))
    end
    lines[#lines + 1] = ("  %s: left in phase %s%s"):format(name, tostring(s.phase),
      #detail > 0 and (" (" .. table.concat(detail, ", ") .. ")") or "")
    for _, c in ipairs(journal.live_children(s, opts)) do
      lines[#lines + 1] = ("    still running from that run: %s: nothing acts on %s until it has ended")
        :format(journal.child_text(c), name)
    end
  end
  if #journal.in_flight(data) == 0 then
    lines[#lines + 1] = "  no service was in flight"
  end
  for _, line in ipairs(journal.describe_weights(data)) do lines[#lines + 1] = "  " .. line end
  local left = journal.not_started(data)
  if #left > 0 then
    lines[#lines + 1] = "  not started: " .. table.concat(left, ", ")
  end
  lines[#lines + 1] = "resolve: " .. journal.resolve_command(data, "--recover")
    .. "   (or, once fixed by hand: " .. journal.resolve_command(data, "--abandon") .. ")"
  return lines
end

-- The canary weights a run set and had not given back: { "SERVICE: server S at BALANCER has
-- weight W; it had P before the run", ... } (without the weight now: nothing is asked of the balancer).
function journal.describe_weights(data)
  local out, names = {}, {}
  for n in pairs(data.weights or {}) do names[#names + 1] = n end
  table.sort(names)
  for _, n in ipairs(names) do
    local w = data.weights[n]
    out[#out + 1] = ("%s: its canary weight was not given back: server %s at %s had weight %s before the run")
      :format(n, tostring(w.server), tostring(w.balancer), tostring(math.tointeger(w.weight) or w.weight))
  end
  return out
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

-- Opens the journal at path for appends -> log file | nil, message, CODE.
local function open_append(path)
  local f, err, code = log.open(path, { mode = 384 })
  if not f then return nil, ("cannot write the run journal %s: %s"):format(path, tostring(err)), code end
  return f
end

-- journal.create(root, info) -> j | nil, message, CODE
-- info = { run =, argv =, services_file =, user =, order = {names}, kind = "rolling"|... }
-- The header is written atomically and durably (a journal replaced, never appended to another
-- run's), then the file is kept open for the records.
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
  local head = { record = "run" }
  for _, k in ipairs(HEADER) do head[k] = self.data[k] end
  local line = json.encode(head)
  local under = state.under(root)
  under.mode = 384
  under.sync = true
  local ok, err, code = self.fs.write_atomic(self.path, line .. "\n", under)
  if not ok then
    return nil, ("cannot write the run journal %s: %s"):format(self.path, tostring(err)), code
  end
  if self.fs.remote then
    self.lines = { line }
  else
    self.file, err, code = open_append(self.path)
    if not self.file then return nil, err, code end
  end
  return self
end

-- journal.adopt(root, data[, hfs]) -> j: carries on the journal of an interrupted run
-- (recovery): the same record, now appended to by this process.
function journal.adopt(root, data, hfs)
  local pid = fs.getpid()
  data.pid, data.pid_start, data.boot_id = pid, journal.start_time(pid), journal.boot_id()
  data.done = data.done or {}
  data.failed = data.failed or {}
  data.order = data.order or {}
  local self = setmetatable({ root = root, fs = hfs or hostfs.here(), path = state.journal_path(root), data = data },
    journal)
  local err
  if self.fs.remote then
    local text
    text, err = self.fs.read(self.path)
    if text then
      self.lines = {}
      for line in text:gmatch("([^\n]*)\n") do self.lines[#self.lines + 1] = line end
    end
  else
    self.file, err = open_append(self.path)
  end
  if not (self.file or self.lines) then
    -- as for any record that cannot be written: said once, and the recovery goes on
    self.failed = true
    io.stderr:write("rrengine: ", tostring(err), "\n")
  end
  self:append({ record = "adopt", pid = data.pid, pid_start = data.pid_start, boot_id = data.boot_id }, true)
  return self
end

-- j:renew(run, order): the adopted journal goes on as a new run's (--resume after a recovery):
-- its services still in flight stay, what finished is forgotten.
function journal:renew(run, order)
  self.data.run, self.data.order, self.data.done, self.data.failed = run, order, {}, {}
  self:append({ record = "renew", run = run, order = order }, true)
end

-- On another host: makes sure the file there holds the first n lines (fsynced when durable)
-- -> true | nil, message, CODE. One write at a time: two services' records written at once
-- would race, and the rename that came last would drop the other's line. A write in flight is
-- waited for; the next one takes every line appended meanwhile.
function journal:write_remote(n, durable)
  if durable then self.sync_wanted = true end
  local err, code
  while (self.written or 0) < n or (durable and (self.synced or 0) < n) do
    if self.write_task then
      rr.wait(self.write_task)
    else
      local upto, sync = #self.lines, self.sync_wanted or false
      self.sync_wanted = false
      local content = table.concat(self.lines, "\n", 1, upto) .. "\n"
      local under = state.under(self.root)
      under.mode = 384
      under.sync = sync
      self.write_task = rr.spawn(function()
        local ok, werr, wcode = self.fs.write_atomic(self.path, content, under)
        if ok then
          self.written = math.max(self.written or 0, upto)
          if sync then self.synced = math.max(self.synced or 0, upto) end
        else
          self.write_error, self.write_code = werr, wcode
        end
        self.write_task = nil
      end)
      rr.wait(self.write_task)
      if (self.written or 0) < upto then
        err, code = self.write_error, self.write_code
        return nil, err, code
      end
    end
  end
  return true
end

-- j:append(record[, durable]) -> true | nil, message, CODE: one line, fsynced when durable.
-- Here, one write() on the open file. On another host there is no append over ssh that a kill
-- cannot cut short, so the whole file is written again, atomically, through the host's handle
-- (one ssh command either way). A failure is reported once on stderr: the restart goes on (its
-- events still say what happened).
function journal:append(record, durable)
  local ok, err, code
  if self.file then
    ok, err, code = self.file:emit(record)
    if ok and durable then ok, err, code = self.file:sync() end
  elseif self.lines then
    self.lines[#self.lines + 1] = json.encode(record)
    ok, err, code = self:write_remote(#self.lines, durable)
  else
    ok, err, code = nil, "the run journal is closed", "EBADF"
  end
  if not ok then
    err = ("cannot write the run journal %s: %s"):format(self.path, tostring(err))
    if not self.failed then
      self.failed = true
      io.stderr:write("rrengine: ", err, "\n")
    end
    return nil, err, code
  end
  return true
end

-- Which records must survive a power cut: a deploy about to run, a migration started, the unit
-- about to be touched (apply) when that changes what a rollback must undo, a rollback, a member
-- taken out of rotation, a blue-green step. Records whose loss errs on the safe side (recovery
-- sees less progress than there was, and rolls back rather than forward) are not fsynced: each
-- fsync costs milliseconds per service.
local DURABLE_PHASES = { apply = true, rollback = true, drain = true,
  -- a blue-green release (rr.bluegreen): the idle instance started, traffic switched, the old
  -- colour stopped
  ["bg-start"] = true, ["bg-switch"] = true, ["bg-stop-old"] = true }
function journal.durable(fields)
  if fields.phase == "apply" and fields.undo == false then return false end
  return fields.deploy_record ~= nil or fields.migration == "started" or fields.drained == true
    or DURABLE_PHASES[fields.phase] == true
end

-- j:update(service, fields): merges fields into the service's entry (creating it: the service
-- is now in flight) and appends the change.
function journal:update(service, fields)
  local entry = self.data.services[service]
  if not entry then
    entry = {}
    self.data.services[service] = entry
  end
  for k, v in pairs(fields) do entry[k] = v end
  self:append({ record = "set", service = service, set = fields }, journal.durable(fields))
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
  for _, c in ipairs(entry.children) do if c.unit or c.pid ~= pid then kept[#kept + 1] = c end end
  self:update(service, { children = kept })
end

-- j:child_unit(service, unit, host, what) / j:child_unit_done(service, unit): a transient unit
-- the service's flow starts on a host (a remote migration), recorded durably before it starts:
-- its PID is another machine's, so a later run asks that host's manager whether it still runs.
function journal:child_unit(service, unit, host, what)
  local entry = self.data.services[service] or {}
  local children = entry.children or {}
  children[#children + 1] = { unit = unit, host = host, what = what }
  entry.children = children
  self.data.services[service] = entry
  self:append({ record = "set", service = service, set = { children = children } }, true)
end

function journal:child_unit_done(service, unit)
  local entry = self.data.services[service]
  if not entry or not entry.children then return end
  local kept = {}
  for _, c in ipairs(entry.children) do if c.unit ~= unit then kept[#kept + 1] = c end end
  self:update(service, { children = kept })
end

-- j:weight(service, { group =, server =, balancer =, weight = }): the weight a canary had before the
-- run sets its canary weight (durable, written before that weight is set), so that --recover
-- gives it back; j:weight_restored(service): it has it back.
function journal:weight(service, info)
  self.data.weights = self.data.weights or {}
  self.data.weights[service] = info
  return self:append({ record = "weight", service = service, weight = info }, true)
end

function journal:weight_restored(service)
  if not (self.data.weights and self.data.weights[service]) then return true end
  self.data.weights[service] = nil
  return self:append({ record = "weight_restored", service = service })
end

-- j:finished(service, succeeded): the service's flow ended (succeeded, or failed and was
-- rolled back or not touched): it is no longer in flight.
function journal:finished(service, succeeded)
  self.data.services[service] = nil
  local list = succeeded and self.data.done or self.data.failed
  if not list then list = {}; self.data.failed = list end
  list[#list + 1] = service
  self:append({ record = "finished", service = service, ok = succeeded and true or false })
end

-- j:forget(service): a service resolved by recovery.
function journal:forget(service)
  self.data.services[service] = nil
  self:append({ record = "forget", service = service })
end

-- j:close(): the run ended: the journal goes.
function journal:close()
  if not self.path then return true end
  if self.file then self.file:close(); self.file = nil end
  self.lines = nil
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
