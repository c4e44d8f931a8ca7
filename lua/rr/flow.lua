-- The restart flow of one service: pre-check, known-good snapshot, deploy, migrations,
-- daemon-reload, reload or restart, post-check, stabilization, success — and rollback when the
-- new version is not healthy. The steps are the table STEPS below, in order.
local rr = require("rr")
local fs = require("rr.fs")
local health = require("rr.health")
local snapshot = require("rr.snapshot")
local deploy = require("rr.deploy")
local proc = require("rr.proc")
local state = require("rr.state")
local hostfs = require("rr.hostfs")
local remote = require("rr.remote")

local flow = {}

-- Outcomes of flow.run: the runner turns them into the summary and the exit code.
flow.SUCCESS = "success"
flow.FAILED = "failed"             -- not touched, or failed and rolled back
flow.ROLLBACK_FAILED = "rollback_failed"
flow.UNRESOLVED = "unresolved"     -- its host was lost mid-flow: neither finished nor rolled back

-- Where a service lives: { manager, fs (rr.hostfs), state_root, journal (rr.journal | nil),
-- host (nil: this machine) }. A run over several hosts gives ctx.hosts[host or false] per host:
-- the host's manager, its files, its state root and its run journal; without it, everything is
-- this machine's (ctx.manager, ctx.state_root, ctx.run_journal).
function flow.place(ctx, svc)
  local p = ctx.hosts and ctx.hosts[svc.host or false]
  if p then return p end
  return { manager = ctx.manager, fs = hostfs.here(), state_root = ctx.state_root, journal = ctx.run_journal }
end

-- The unit properties the flow reads (inspect, after a daemon-reload, commit): asked for by
-- name, so that a unit in flight holds a dozen values instead of systemd's ~400 (at a thousand
-- services in flight, most of the engine's memory and much of its time per service).
local FLOW_PROPS = { "Id", "LoadState", "ActiveState", "SubState", "FragmentPath", "DropInPaths", "NeedDaemonReload",
  "CanReload", "EnvironmentFiles", "MainPID", "NRestarts", "Result" }
flow.PROPS = FLOW_PROPS

local function ms(seconds)
  return math.floor(seconds * 1000 + 0.5)
end

-- The files that make up a unit's definition, in the shape rr.snapshot takes.
function flow.definition_files(props)
  local files = {}
  if props.FragmentPath and props.FragmentPath ~= "" then
    files[#files + 1] = { path = props.FragmentPath, role = "unit" }
  end
  for _, p in ipairs(props.DropInPaths or {}) do
    files[#files + 1] = { path = p, role = "dropin" }
  end
  for _, e in ipairs(props.EnvironmentFiles or {}) do
    files[#files + 1] = { path = e.path, role = "envfile", optional = e.optional }
  end
  return files
end

-- Drop-ins on disk that systemd does not list yet. systemd 252 notices neither a drop-in in a
-- brand-new <unit>.d/ directory (NeedDaemonReload stays "no") nor lists it in DropInPaths, so
-- without this look a new drop-in would be "reloaded" without ever being applied.
function flow.unlisted_dropins(svc, props, user, hfs)
  local fs = hfs or fs
  local listed, found, seen = {}, {}, {}
  for _, p in ipairs(props.DropInPaths or {}) do listed[p] = true end
  -- beside the unit file, and where an operator drops overrides (systemctl edit writes to
  -- /etc/systemd/system or ~/.config/systemd/user even for a unit file under /usr/lib)
  local dirs = {}
  local fragment = props.FragmentPath
  if fragment and fragment ~= "" then dirs[#dirs + 1] = fragment:match("^(.*)/[^/]+$") end
  if user then
    -- the host's own directories (its sessions' variables)
    local getenv = fs.getenv or os.getenv
    local config = getenv("XDG_CONFIG_HOME")
    if not config or config == "" then config = (getenv("HOME") or "") .. "/.config" end
    dirs[#dirs + 1] = config .. "/systemd/user"
    if getenv("XDG_RUNTIME_DIR") then dirs[#dirs + 1] = getenv("XDG_RUNTIME_DIR") .. "/systemd/user" end
  else
    dirs[#dirs + 1] = "/etc/systemd/system"
    dirs[#dirs + 1] = "/run/systemd/system"
  end
  for _, base in ipairs(dirs) do
    local dir = base .. "/" .. svc.unit .. ".d"
    if not seen[dir] then
      seen[dir] = true
      for _, name in ipairs(fs.list(dir) or {}) do
        local path = dir .. "/" .. name
        if name:match("%.conf$") and not listed[path] then
          found[#found + 1] = path
        end
      end
    end
  end
  return found
end

-- What rollback would restore: the known-good snapshot, the files on disk now, and how they
-- differ. Used by the flow, the dry run and plans/rollback.lua.
function flow.definition_state(ctx, svc, props)
  local current = flow.definition_files(props)
  local place = flow.place(ctx, svc)
  local snaps = snapshot.on(place.fs)
  local unlisted = flow.unlisted_dropins(svc, props, ctx.user, place.fs)
  for _, path in ipairs(unlisted) do
    current[#current + 1] = { path = path, role = "dropin" }
  end
  local known = snaps.known_good(place.state_root, svc.name)
  local changes = known and snaps.diff(known, current, { unit = svc.unit }) or {}
  -- ctx.initially_stale: what the run saw before any service's daemon-reload, which also
  -- clears NeedDaemonReload on the units that come later in the run.
  local stale = props.NeedDaemonReload == true or #unlisted > 0
    or (ctx.initially_stale ~= nil and ctx.initially_stale[svc.name] == true)
  return {
    current = current,
    known = known,
    changes = changes,
    -- systemd's copy is older than the files on disk: daemon-reload before applying
    stale = stale,
    -- systemd runs something other than what is on disk, or disk differs from what last worked
    changed = stale or #changes > 0,
    unknown = known == nil and stale,
  }
end

-- Why reload or restart; returns method, reason.
function flow.choose_method(svc, props, def)
  if not svc.reload then
    return "restart", "reload not configured"
  end
  if not props.CanReload then
    return "restart", "the unit has no ExecReload"
  end
  if def.changed then
    return "restart", "the unit's definition changed (a reload would not apply it)"
  end
  return "reload", "reload configured and the definition is unchanged"
end

local Run = {}
Run.__index = Run

function Run:emit(name, fields)
  fields = fields or {}
  fields.service = fields.service or self.svc.name
  fields.unit = fields.unit or self.svc.unit
  return self.ctx.events:emit(name, fields)
end

function Run:step(name)
  self.current_step = name
  if self.ctx.on_step then
    self.ctx.on_step(self.svc, name)
  end
end

function Run:check(phase)
  local t0 = rr.now()
  local ok, info = health.check(self.unit, self.svc.health)
  if ok then
    self:emit("HEALTH_CHECK_PASSED", { phase = phase, duration_ms = ms(rr.now() - t0),
      detail = info and info.detail, probes = info and info.probes })
    return true
  end
  self:emit("HEALTH_CHECK_FAILED", { phase = phase, duration_ms = ms(rr.now() - t0), error = info })
  return nil, info
end

-- Runs a unit job and reports it as an event; true | nil, err.
function Run:job(method)
  local t0 = rr.now()
  -- start_timeout bounds the jobs that start the unit, stop_timeout the stop (never the start's:
  -- a slow stop is systemd's TimeoutStopSec to bound); systemd's own timeouts apply inside. Past
  -- rrengine's limit a stop is escalated (every process of the unit killed) and still waited for.
  local timeout
  if method == "stop" then timeout = self.svc.stop_timeout else timeout = self.svc.start_timeout end
  local r = table.pack(self.unit[method](self.unit, "replace", timeout and { timeout = timeout } or nil))
  local fields = { method = method, duration_ms = ms(rr.now() - t0) }
  if r[1] then
    fields.result = r[2]
    fields.unit_result = r[3]
    fields.escalated = r[4] -- "SIGKILL": the stop outlived stop_timeout
    self:emit("UNIT_JOB_DONE", fields)
    return true
  end
  fields.error = r[2]
  if r[3] == "ETIMEDOUT" then
    -- systemd still runs the job (its path in r[4]): the next job on the unit replaces it
    fields.job_result, fields.job, fields.escalated = "timeout", r[4], r[5]
  else
    fields.job_result, fields.unit_result, fields.escalated = r[3], r[4], r[5]
  end
  self:emit("UNIT_JOB_FAILED", fields)
  return nil, r[2]
end

function Run:daemon_reload()
  local ok, err = self.manager:daemon_reload()
  self:emit(ok and "DAEMON_RELOAD" or "DAEMON_RELOAD_FAILED", { error = err })
  return ok, err
end

function Run:hook(name, ...)
  local set = self.ctx.hooks_for(self.svc)
  if not set then return true end
  local ok, reason = set:call(name, ...)
  if ok == nil then
    self:emit("HOOK_FAILED", { hook = name, error = reason })
  end
  return ok, reason
end

-- Stabilization: for svc.stabilize seconds the unit must stay active with the same MainPID
-- and NRestarts (watched through PropertiesChanged signals) and, for HTTP checks, keep
-- answering healthy. The first sign of trouble ends it at once.
function Run:stabilize()
  local secs = self.svc.stabilize
  if secs <= 0 then return true end
  self:step("stabilize")
  self:emit("STABILIZE_START", { seconds = secs })
  local base, berr = self.unit:properties({ "ActiveState", "MainPID", "NRestarts" })
  if not base or base.ActiveState ~= "active" then
    return nil, "unit is " .. (base and base.ActiveState or ("unknown: " .. tostring(berr))) .. " at the start of stabilization"
  end
  local deadline = rr.now() + secs
  -- Each watcher returns a failure text, or nothing when it saw the whole period through; the
  -- first failure wins and the other watcher is cancelled with it.
  local function watch_unit()
    -- compared with base, not with the moment the wait starts: nothing slips in between
    local p, err, code = self.unit:wait_change({ "ActiveState", "MainPID", "NRestarts" },
      math.max(deadline - rr.now(), 0.001), base)
    if not p then
      if code == "ETIMEDOUT" then return nil end -- it stayed put
      return "cannot watch the unit: " .. tostring(err)
    end
    if p.ActiveState ~= "active" then
      return "unit left active (" .. tostring(p.ActiveState) .. ")"
    elseif (p.NRestarts or 0) > (base.NRestarts or 0) then
      return ("unit restarted by systemd (NRestarts %d -> %d)"):format(base.NRestarts or 0, p.NRestarts)
    end
    return ("main process changed (MainPID %s -> %s)"):format(tostring(base.MainPID), tostring(p.MainPID))
  end
  local function probe_service()
    local hc = self.svc.health
    while rr.now() < deadline do
      rr.sleep(math.min(hc.interval, math.max(deadline - rr.now(), 0)))
      if rr.now() >= deadline then return nil end
      local kind, detail = health.probe(hc, math.min(math.max(hc.interval, 1), 5))
      if kind ~= "healthy" then
        return "probe failed during stabilization: " .. detail
      end
    end
  end
  -- Both watchers end at the deadline at the latest: the first to end says how it went (a
  -- failure text, or nothing), and the other one is cancelled with the race.
  local watchers = { watch_unit }
  if self.svc.health.kind == "http" then watchers[2] = probe_service end
  local i, result = rr.race(watchers)
  local failure = result
  if i == nil then failure = "cannot watch the unit: " .. tostring(result) end
  if failure then
    self:emit("STABILIZE_FAILED", { error = failure })
    return nil, failure
  end
  self:emit("STABILIZE_END", { seconds = secs })
  return true
end

-- The manual steps printed when a rollback fails: what an operator types at 3 a.m.
function Run:manual_steps()
  local sc = self.ctx.user and "systemctl --user" or "systemctl"
  local unit = self.svc.unit
  local fs = self.fs
  local steps = { ("%s stop %s"):format(sc, unit) }
  if self.svc.host then
    table.insert(steps, 1, ("ssh %s   # the steps below run on %s, the rrengine one here"):format(
      flow.shell_quote(self.svc.host), self.svc.host))
  end
  -- only a deploy still not undone: an undo that already happened is not repeated
  if self.touched.deploy then
    steps[#steps + 1] = ("rrengine plans/rollback.lua%s%s --service %s --deploy-record %s   # undo the code deploy")
      :format(self.ctx.services_file and (" --services " .. flow.shell_quote(self.ctx.services_file)) or "",
        self.ctx.user and " --user" or "", self.svc.name, flow.shell_quote(self.touched.deploy.state_dir or "?"))
  end
  local known = self.def and self.def.known
  local snapshot = self.snaps
  if known then
    -- only the files that still differ from the known good: what was restored is not repeated
    for _, f in ipairs(known.files or {}) do
      local own = f.role ~= "dropin" or snapshot.dropin_scope(f.path, self.svc.unit) == "own"
      local q = flow.shell_quote
      if f.absent then
        if fs.exists(f.path) then
          steps[#steps + 1] = own and ("rm -f %s"):format(q(f.path))
            or ("check by hand: %s is shared with other units (absent at the last known good)"):format(f.path)
        end
      elseif f.stored and fs.sha256(f.path) ~= f.sha256 then
        if own then
          steps[#steps + 1] = ("cp -p %s %s"):format(q(known.dir .. "/" .. f.stored), q(f.path))
        else
          steps[#steps + 1] = ("check by hand: %s is shared with other units (known-good copy: %s/%s)")
            :format(f.path, known.dir, tostring(f.stored))
        end
      end
    end
    for _, c in ipairs(self.def.changes or {}) do
      if c.change == "added" and not c.shared and fs.exists(c.path) then
        steps[#steps + 1] = ("rm %s   # added since the last known good"):format(flow.shell_quote(c.path))
      end
    end
  end
  -- reset-failed refuses a unit systemd unloaded (inactive after the daemon-reload): its error
  -- must not stop the start
  steps[#steps + 1] = ("%s daemon-reload && { %s reset-failed %s 2>/dev/null; %s start %s; }"):format(sc, sc, unit,
    sc, unit)
  steps[#steps + 1] = ("journalctl %s-u %s -n 50"):format(self.ctx.user and "--user " or "", unit)
  return steps
end

-- Rollback, in the order that keeps each step meaningful: stop; the down-migration while the
-- new code (which ships it) is still in place; the known-good definition; the code deploy
-- undone; daemon-reload; reset-failed (a unit that hit its start limit while flapping must be
-- startable again); start; health check.
function Run:rollback(reason)
  self:journal({ phase = "rollback" })
  self:step("rollback")
  local t0 = rr.now()
  self:emit("ROLLBACK_START", { reason = reason,
    migrations_not_undone = self.touched.migrated and not self.svc.migrate_rollback or nil })
  local problems = {}
  local function problem(msg) problems[#problems + 1] = msg end

  local ok, err = self:job("stop")
  if not ok then problem("stop: " .. err) end

  if self.touched.migrated then
    if self.svc.migrate_rollback then
      self:emit("MIGRATION_ROLLBACK_START", { command = self.svc.migrate_rollback })
      local res, merr, _, r = self:run_command(self.svc.migrate_rollback, "MIGRATION_ROLLBACK_OUTPUT")
      self:emit("MIGRATION_ROLLBACK_END", { exit_code = (res or r or {}).exit_code, error = not res and merr or nil })
      if not res then problem("migrate_rollback: " .. tostring(merr)) end
    else
      self:emit("MIGRATION_NOT_UNDONE", {
        note = "migrations are not undone; the old code runs against the migrated database" })
    end
  end

  if self.def and self.def.known then
    local props = self.unit:properties() or self.props or {}
    local current = flow.definition_files(props)
    for _, path in ipairs(flow.unlisted_dropins(self.svc, props, self.ctx.user, self.fs)) do
      current[#current + 1] = { path = path, role = "dropin" }
    end
    -- Files the known-good had that systemd no longer lists (a drop-in removed since) come
    -- back too: restore works on the union of both lists.
    local restored, rerr = self.snaps.restore(self.def.known, current, { unit = self.svc.unit })
    if restored then
      self:emit("DEFINITION_RESTORED", { restored = restored.restored, removed = restored.removed,
        manual = restored.manual, snapshot = self.def.known.dir })
      if restored.manual and #restored.manual > 0 then
        self:emit("WARNING", { warning = "shared drop-ins changed since the last known good and were left as they are: "
          .. table.concat(restored.manual, ", ") })
      end
    else
      problem("restore definition: " .. tostring(rerr))
    end
  elseif self.def and self.def.changed then
    problem("no known-good definition to restore")
  end

  ok, err = self:undo_deploy()
  if not ok then problem(err) end

  ok, err = self:daemon_reload()
  if not ok then problem("daemon-reload: " .. tostring(err)) end
  self.unit:reset_failed()
  ok, err = self:job("start")
  if not ok then
    problem("start: " .. err)
  elseif not self.ctx.opts.force then
    ok, err = self:check("rollback")
    if not ok then problem("health after rollback: " .. err) end
  end
  if self.touched.drained then
    if #problems == 0 then
      -- healthy on the old version: only now back in rotation
      local eok, eerr = self:enable("healthy again after the rollback")
      if not eok then problem(eerr) end
    else
      local b, member = self:balancer()
      self:emit("WARNING", { warning = ("%s stays out of rotation at %s: it is not healthy"):format(member.server,
        b:describe()) })
    end
  end
  self:hook("on_rollback", self.svc, { reason = reason, ok = #problems == 0 })

  if #problems == 0 then
    self:emit("ROLLBACK_SUCCESS", { duration_ms = ms(rr.now() - t0), reason = reason })
    return true
  end
  local steps = self:manual_steps()
  self:emit("ROLLBACK_FAILED", { duration_ms = ms(rr.now() - t0), reason = reason,
    error = table.concat(problems, "; "), manual_steps = steps })
  return nil, table.concat(problems, "; "), steps
end

-- Undoes the deploy this flow (or the rollback's caller) recorded -> true | nil, message. The
-- pointers naming it go once it is undone; after a failed undo they stay, so that a manual
-- rollback finishes this undo and no other.
function Run:undo_deploy()
  local record = self.touched.deploy
  if not record then return true end
  if self.undo_failed then return nil, "undo deploy: " .. self.undo_failed end
  local ok, err = self.deploys.undo(record)
  if not ok then
    self.undo_failed = tostring(err)
    return nil, "undo deploy: " .. tostring(err)
  end
  self:emit("DEPLOY_UNDONE", { target = record.target })
  state.deploy_undone(self.state_root, self.svc.name, record.state_dir, self.fs)
  self.touched.deploy = nil
  return true
end

-- The load balancer in front of this service, when its group has one: b, member, group.
function Run:balancer()
  local g = self.svc.group and self.ctx.platform and self.ctx.platform.groups
    and self.ctx.platform.groups[self.svc.group]
  local b = g and self.ctx.balancers and self.ctx.balancers[self.svc.group]
  if not b then return nil end
  return b, { name = self.svc.name, server = self.svc.balancer_server or self.svc.name }, g
end

-- Puts a drained member back in rotation -> true | nil, message. `weighted`: on the new version,
-- where a canary serves at its group's canary weight (ctx.canary_weights, set by rr.rolling).
function Run:enable(why, weighted)
  if not self.touched.drained then return true end
  local b, member = self:balancer()
  if not b then return true end
  if weighted and self.ctx.canary_weights then member.weight = self.ctx.canary_weights[self.svc.name] end
  local ok, err = b:enable(member)
  if not ok then
    self:emit("BALANCER_FAILED", { action = "enable", server = member.server, error = err })
    return nil, ("cannot put %s back in rotation at %s: %s"):format(member.server, b:describe(), tostring(err))
  end
  self.touched.drained = nil
  self:journal({ drained = false })
  self:emit("BALANCER_ENABLE", { server = member.server, balancer = b:describe(), reason = why, weight = member.weight })
  return true
end

-- Records the flow's progress in the run journal (when the run keeps one).
function Run:journal(fields)
  local j = flow.place(self.ctx, self.svc).journal
  if j then j:update(self.svc.name, fields) end
end

-- Runs a migration command in working_dir as a transient unit of the manager (rr.systemd's
-- m:run), each output line an event -> res | nil, message, CODE[, res]. A unit, not a child
-- process: everything the command starts stays in the unit's cgroup, so the timeout and a
-- cancelled flow end all of it, a process that left its group (setsid, a daemon) included. The
-- unit's main process is in the run journal while it runs: a later run must not act on this
-- service while a migration of a dead run goes on.
function Run:run_command(argv, output_event)
  local svc, j = self.svc, flow.place(self.ctx, self.svc).journal
  if self.fs.remote then return self:run_remote_command(argv, output_event) end
  local pid
  local res, err, code, r = self.manager:run(argv, {
    cwd = svc.working_dir,
    -- a migration killed half-way is worse than a slow one: 30 minutes unless the service says
    timeout = svc.migrate_timeout or 1800,
    -- rrengine-migration-sso.api-<random>.service, rrengine-migration-rollback-...
    name_prefix = ("rrengine-%s-%s"):format((output_event:lower():gsub("_output$", ""):gsub("_", "-")),
      (svc.name:gsub("[^%w:_.-]", "_"))):sub(1, 200),
    on_line = function(stream, line)
      self:emit(output_event, { stream = stream, line = line })
    end,
    on_start = function(unit, main_pid)
      pid = main_pid
      if j and pid then j:child(svc.name, pid, table.concat(argv, " ") .. ", as unit " .. unit) end
    end,
  })
  if j and pid then j:child_done(svc.name, pid) end
  if res then return res end
  return nil, err, code, r
end

-- The same on another host: `systemd-run --wait --pipe` through ssh (rr.remote quotes every
-- word for the remote shell), so the command is a transient unit of that host's manager there
-- too: RuntimeMaxSec= ends everything it started at the timeout, even when this engine is gone.
-- systemd expands `$VAR` and `${VAR}` in an ExecStart= argv, so the command's words never go
-- there: they travel on stdin, NUL-separated (spec/hosts_rolling_spec.lua checks spaces, quotes,
-- `$`, `%`, backslashes and tabs byte for byte).
function Run:run_remote_command(argv, output_event)
  local svc = self.svc
  local timeout = svc.migrate_timeout or 1800
  local name = ("rrengine-%s-%s-%08x"):format((output_event:lower():gsub("_output$", ""):gsub("_", "-")),
    (svc.name:gsub("[^%w:_.-]", "_")), math.random(0, 0x7fffffff)):sub(1, 240)
  local words = { "systemd-run" }
  if self.ctx.user then words[#words + 1] = "--user" end
  for _, w in ipairs({ "--wait", "--pipe", "--quiet", "--collect", "--unit=" .. name,
      "-p", ("RuntimeMaxSec=%d"):format(math.ceil(timeout)), "-p", "TimeoutStopSec=2" }) do
    words[#words + 1] = w
  end
  if svc.working_dir then words[#words + 1] = "--working-directory=" .. svc.working_dir end
  -- the command's words go through stdin, never through ExecStart=: xargs -0 hands them to
  -- `exec "$@"` as they are (the command's own stdin is /dev/null, as with m:run)
  for _, w in ipairs({ "--", "xargs", "-0", "-x", "sh", "-c", 'exec "$@"', "rrengine-run" }) do
    words[#words + 1] = w
  end
  local parts = {}
  for i, a in ipairs(argv) do parts[i] = tostring(a) end
  -- Named in the host's journal before it starts (its PID is the host's): a run that resolves a
  -- killed one asks that host's manager whether the unit still runs, and leaves the service alone
  -- until it has ended (it keeps running when this engine dies, up to RuntimeMaxSec=).
  local j = flow.place(self.ctx, svc).journal
  if j then j:child_unit(svc.name, name .. ".service", svc.host, table.concat(parts, " ")) end
  local t0 = rr.now()
  local res, err, code, r = self.fs.run(words, {
    timeout = timeout + 10, capture = true, stdin = table.concat(parts, "\0") .. "\0",
    on_line = function(stream, line) self:emit(output_event, { stream = stream, line = line }) end,
  })
  -- ended (or its host lost: then the journal stays as it was, and recovery asks the host)
  if j and (res or code == "EEXIT") then j:child_unit_done(svc.name, name .. ".service") end
  if res then return res end
  if code == "EEXIT" and rr.now() - t0 >= timeout then
    return nil, ("%s on %s timed out after %g s (killed)"):format(tostring(argv[1]), svc.host, timeout), "ETIMEDOUT", r
  end
  if code == "EEXIT" then
    err = ("%s on %s exited with code %s"):format(tostring(argv[1]), svc.host, tostring(r and r.exit_code))
  end
  return nil, err, code, r
end

-- Ends the flow with a failure, undoing what the steps touched: a full rollback once the unit
-- was touched, else only the deploy (the service still runs what it ran).
function Run:fail(reason)
  local svc = self.svc
  if self.veto then
    self:emit("SERVICE_SKIPPED", { reason = self.veto })
    return flow.FAILED, self.veto, { touched = false, vetoed = true }
  end
  local lost = self:host_lost()
  if lost then
    -- Nothing can be undone on a host that cannot be reached: its journal there keeps what was
    -- in flight, and --recover resolves it once the host is back.
    local phase = self.current_step or "?"
    local why = ("host %s was lost in phase %s (%s): %s"):format(svc.host, phase, lost, reason)
    self:emit("SERVICE_RESTART_FAILED", { error = why, host = svc.host, host_lost = true, phase = phase,
      duration_ms = ms(rr.now() - self.t0) })
    return flow.UNRESOLVED, why, { host_lost = lost, phase = phase }
  end
  local rolled_back, problem, steps
  if self.touched.unit then
    local ok, err, s = self:rollback(reason)
    rolled_back, problem, steps = ok and true or false, err, s
  elseif self.touched.deploy then
    local ok, err = self:undo_deploy()
    if not ok then
      problem, steps = err, self:manual_steps()
      self:emit("ROLLBACK_FAILED", { reason = reason, error = problem, manual_steps = steps })
    end
  end
  local fields = { error = reason, rollback_error = problem, duration_ms = ms(rr.now() - self.t0) }
  if self.touched.unit then fields.rolled_back = rolled_back else fields.touched = false end
  self:emit("SERVICE_RESTART_FAILED", fields)
  self:hook("on_failure", svc, reason)
  if problem then
    return flow.ROLLBACK_FAILED, reason .. "; rollback failed: " .. problem, { manual_steps = steps }
  end
  if rolled_back then
    return flow.FAILED, reason, { rolled_back = true }
  end
  return flow.FAILED, reason, { touched = false }
end

-- Whether the service's host was lost -> why | nil. Asked on a failure only: one command on the
-- host (a connection that works answers in milliseconds; a dead one fails at once, a silent one
-- within 10 s).
function Run:host_lost()
  local place = flow.place(self.ctx, self.svc)
  if not self.fs or not self.fs.remote then return nil end
  if place.lost then return place.lost end
  local ok, err, code = self.fs.run({ "true" }, { timeout = 5 })
  if ok or code == "EEXIT" then return nil end
  place.lost = tostring(err)
  return place.lost
end

-- A word for a POSIX shell, quoted only when it needs to be (manual steps are pasted).
function flow.shell_quote(word)
  word = tostring(word)
  if word:match("^[%w%._/:@%%+=,-]+$") then return word end
  return "'" .. word:gsub("'", "'\\''") .. "'"
end

-- The restart flow as named steps, in order. Each step is fn(run) -> true | nil, reason, and
-- records on run.touched what it changed, so that a failure undoes exactly that:
--   touched.unit        a unit job or daemon-reload ran: a failure rolls the service back
--   touched.deploy      the deploy record (rsync ran): undone on failure
--   touched.migrated    the migration ran to its end (migrate_rollback, or a warning)
-- A failure before the unit was touched only undoes the deploy (a failed migration): the
-- service keeps running the code and definition it had.
local STEPS = {}

-- inspect: the unit is loaded, and the before_restart hooks agree.
STEPS[#STEPS + 1] = { name = "inspect", fn = function(self)
  local props, perr = self.unit:properties(FLOW_PROPS)
  if not props then
    return nil, "cannot read the unit: " .. tostring(perr)
  end
  if props.LoadState ~= "loaded" then
    return nil, ("unit %s is %s"):format(self.svc.unit, tostring(props.LoadState))
  end
  self.props = props
  local b, member = self:balancer()
  if b then
    -- a member someone took out of rotation is reported, never silently put back
    local st, berr = b:state(member)
    if not st then
      return nil, ("cannot read %s at %s: %s"):format(member.server, b:describe(), tostring(berr))
    end
    if st.admin == "maint" then
      return nil, ("%s is in maintenance at %s (set outside this run): not touched"):format(member.server, b:describe())
    end
  end
  local vetoed, why = self:hook("before_restart", self.svc)
  if vetoed == false then
    self.veto = "vetoed by hook: " .. why
    return nil, self.veto
  elseif vetoed == nil then
    return nil, why
  end
  return true
end }

-- pre-check: an unhealthy service is not touched.
STEPS[#STEPS + 1] = { name = "pre-check", skip_with_force = true, fn = function(self)
  local ok, err = self:check("pre")
  if not ok then
    return nil, "pre-restart health check failed: " .. err
  end
  self.prechecked = true
  return true
end }

-- snapshot: what last worked, and what is on disk now. On a service's first run the files on
-- disk are the ones systemd runs and they are healthy: they become the known good.
STEPS[#STEPS + 1] = { name = "snapshot", fn = function(self)
  local ctx, svc, opts = self.ctx, self.svc, self.ctx.opts
  local def = flow.definition_state(ctx, svc, self.props)
  self.def = def
  if not def.known and self.prechecked and not def.stale then
    local snap, err = self.snaps.capture(self.state_root, svc.name, def.current, { run = ctx.events.run, unit = svc.unit })
    if snap then
      snap, err = self.snaps.promote(self.state_root, svc.name, snap)
    end
    if not snap then
      return nil, "cannot snapshot the unit definition: " .. tostring(err)
    end
    def.known = snap
    self:emit("SNAPSHOT_KNOWN_GOOD", { snapshot = snap.dir, files = #def.current })
  elseif def.unknown then
    local msg = "the unit's definition changed on disk and systemd has not loaded it yet"
      .. (self.props.NeedDaemonReload and " (NeedDaemonReload=yes)" or " (a new drop-in)")
      .. ", and there is no known-good snapshot:"
      .. " rollback could not bring back the earlier definition"
    if not (opts.accept_unknown_definition or opts.force) then
      return nil, msg .. " (run with --accept-unknown-definition to go on anyway)"
    end
    self:emit("WARNING", { warning = msg })
  end
  if #def.changes > 0 then
    local list = {}
    for _, c in ipairs(def.changes) do list[#list + 1] = c.change .. " " .. c.path end
    self:emit("DEFINITION_CHANGED", { changes = list })
  end
  -- What the definition files hold now: a deploy or a migration may change one of them (an
  -- environment file shipped with the release), which then needs a restart, not a reload.
  self.def_hashes = flow.hashes(def.current, self.fs)
  return true
end }

-- deploy: rsync the release into working_dir, recording how to undo it.
STEPS[#STEPS + 1] = { name = "deploy", when = function(self) return self.ctx.opts.deploy and self.svc.working_dir end,
  fn = function(self)
  local ctx, svc, opts = self.ctx, self.svc, self.ctx.opts
  local t0 = rr.now()
  self:emit("DEPLOY_START", { source = opts.deploy_path, target = svc.working_dir })
  local record_dir = state.record_dir(self.state_root, ctx.events.run, svc.name)
  -- Named before rsync runs: an engine killed from here on leaves the pointer to the record that
  -- undoes it.
  local pok, perr = state.deploy_begin(self.state_root, svc.name, record_dir, self.fs)
  if not pok then
    return nil, "cannot record the deploy before running it: " .. tostring(perr)
  end
  self.record_dir = record_dir
  self:journal({ deploy_record = record_dir })
  local j = flow.place(ctx, svc).journal
  local record, err, partial = self.deploys.apply{
    source = opts.deploy_path, target = svc.working_dir, delete = svc.deploy_delete,
    -- rsync's quick check (size + mtime) would skip a changed file of the same size built in
    -- the same second: a release must land whole, so compare contents.
    checksum = true,
    state_dir = record_dir, timeout = svc.deploy_timeout or 1800, manager = self.manager,
    on_spawn = j and function(pid, what)
      j:child(svc.name, pid, what)
      return function() j:child_done(svc.name, pid) end
    end,
  }
  if not record then
    self:emit("DEPLOY_FAILED", { error = err, duration_ms = ms(rr.now() - t0) })
    if partial and partial.state ~= "undone" then
      -- apply could not undo its own partial deploy: the working dir is half new, half old. The
      -- pointer stays, so that a manual rollback finishes this undo and no other.
      self.touched.deploy = partial
      self.undo_failed = "the partial deploy could not be undone"
      return nil, "deploy failed: " .. tostring(err)
    end
    state.deploy_undone(self.state_root, svc.name, record_dir, self.fs)
    return nil, "deploy failed (working dir left as it was): " .. tostring(err)
  end
  self.touched.deploy = record
  self:emit("DEPLOY_END", { duration_ms = ms(rr.now() - t0),
    created = #(record.created or {}), replaced = #(record.backed_up or {}) })
  return true
end }

-- migrate: a failure undoes the deploy and fails the service without a restart.
STEPS[#STEPS + 1] = { name = "migrate", when = function(self) return self.svc.migrate end, fn = function(self)
  local svc = self.svc
  if self.ctx.opts.skip_migrations then
    self:emit("MIGRATION_SKIPPED", { reason = "--skip-migrations" })
    return true
  end
  local t0 = rr.now()
  self:emit("MIGRATION_START", { command = svc.migrate })
  self:journal({ migration = "started" })
  local res, err, _, r = self:run_command(svc.migrate, "MIGRATION_OUTPUT")
  local out = res or r or {}
  self:emit("MIGRATION_END", { exit_code = out.exit_code, duration_ms = ms(rr.now() - t0),
    error = not res and err or nil })
  if not res then
    self:journal({ migration = "failed" })
    return nil, "migration failed: " .. tostring(err)
  end
  self.touched.migrated = true
  self:journal({ migration = "finished" })
  return true
end }

-- drain: a replica behind a load balancer leaves the rotation before it goes down, and its
-- requests in flight end (sessions reach 0, or the group's drain_timeout passes).
STEPS[#STEPS + 1] = { name = "drain", when = function(self) return self:balancer() ~= nil end, fn = function(self)
  local b, member, group = self:balancer()
  local t0 = rr.now()
  local ok, err = b:drain(member)
  if not ok then
    self:emit("BALANCER_FAILED", { action = "drain", server = member.server, error = err })
    return nil, ("cannot drain %s at %s: %s"):format(member.server, b:describe(), tostring(err))
  end
  self.touched.drained = true
  self:journal({ drained = true })
  local timeout = group.drain_timeout or 30
  local drained, derr = b:wait_drained(member, timeout)
  local left
  if not drained then
    local st = b:state(member)
    left = st and st.sessions or nil
  end
  self:emit("BALANCER_DRAIN", { server = member.server, balancer = b:describe(), duration_ms = ms(rr.now() - t0),
    sessions_left = left, timed_out = not drained or nil, note = not drained and tostring(derr) or nil })
  return true
end }

-- apply: daemon-reload when systemd's copy is stale, then reload or restart (a failed reload
-- falls back to a restart). Decided now, after the deploy and the migration, from the
-- definition as it is: a release that changed an environment file needs a restart.
STEPS[#STEPS + 1] = { name = "apply", shows_own_steps = true, fn = function(self)
  local svc, def = self.svc, self.def
  local props = self.props
  if def.changed then
    -- systemd's own check, before the daemon-reload makes a typo the running definition (and,
    -- once healthy, the known good one: systemd ignores an unknown key with a warning)
    local findings = flow.verify_definition(self.ctx, def, self.fs)
    if #findings > 0 then
      self:emit("DEFINITION_INVALID", { findings = findings })
      local text = findings[1] .. (#findings > 1 and (" (and %d more)"):format(#findings - 1) or "")
      if not self.ctx.opts.force then
        return nil, "the changed definition does not pass systemd-analyze verify: " .. text
          .. " (fix it, or --force to go on anyway)"
      end
      self:emit("WARNING", { warning = "--force: going on with a definition systemd-analyze finds fault with: " .. text })
    end
  end
  if def.stale then
    self:step("daemon-reload")
    self.touched.unit = true
    local ok, err = self:daemon_reload()
    if not ok then
      return nil, "daemon-reload failed: " .. tostring(err)
    end
    props = self.unit:properties(FLOW_PROPS) or props
  end
  local changed = flow.changed_files(def.current, self.def_hashes, self.fs)
  if #changed > 0 then
    def.changed = true
    self:emit("DEFINITION_CHANGED", { changes = changed, by = "deploy or migration" })
  end
  local method, reason = flow.choose_method(svc, props, def)
  self:step(method)
  self:emit("UNIT_" .. method:upper(), { reason = reason })
  self.touched.unit = true
  local ok, err = self:job(method)
  if not ok and method == "reload" then
    self:emit("RELOAD_FALLBACK", { error = err })
    method = "restart"
    self:step("restart")
    ok, err = self:job("restart")
  end
  self.method = method
  if not ok then
    return nil, method .. " failed: " .. err
  end
  local hok, herr = self:hook("after_restart", svc, { method = method })
  if hok == nil then
    return nil, herr
  end
  return true
end }

-- verify: post-check, stabilization, final check.
STEPS[#STEPS + 1] = { name = "verify", shows_own_steps = true, skip_with_force = true, fn = function(self)
  local method = self.method
  self:step("post-check")
  local ok, err = self:check("post")
  if not ok then
    return nil, "unhealthy after " .. method .. ": " .. err
  end
  self:journal({ verified = true })
  -- healthy on the new version: back in rotation, then stabilized while serving
  ok, err = self:enable("post-check passed", true)
  if not ok then return nil, err end
  ok, err = self:stabilize()
  if not ok then
    return nil, "unstable after " .. method .. ": " .. err
  end
  if self.svc.stabilize > 0 then
    self:step("final-check")
    ok, err = self:check("final")
    if not ok then
      return nil, "final health check failed: " .. err
    end
  end
  return true
end }

-- commit: this definition is now the known-good one (unless --force skipped the checks that
-- would have shown it works); the deploy becomes the last good one.
STEPS[#STEPS + 1] = { name = "commit", shows_own_steps = true, fn = function(self)
  local ctx, svc = self.ctx, self.svc
  if ctx.opts.force then
    self:emit("WARNING", { warning = "--force: the definition was not health-checked, so it does not become the known good one" })
  elseif self.def and self.def.known and not self.def.changed then
    -- the definition that ran is the known good one already: nothing to store (a snapshot costs
    -- a dozen fsyncs, the largest part of the engine's own time per service)
    self.known_good_kept = true
  else
    local cur = self.unit:properties(FLOW_PROPS) or self.props
    local snap, serr = self.snaps.capture(self.state_root, svc.name, flow.definition_files(cur),
      { run = ctx.events.run, unit = svc.unit })
    if snap then
      snap, serr = self.snaps.promote(self.state_root, svc.name, snap)
    end
    if not snap then
      self:emit("WARNING", { warning = "cannot record the known-good snapshot: " .. tostring(serr) })
    end
  end
  local record = self.touched.deploy
  if record then
    state.deploy_commit(self.state_root, svc.name, self.record_dir, self.fs)
    -- old deploy backups go; this one, and any unfinished one, stay
    self.deploys.prune(self.state_root, svc.name, { keep = deploy.KEEP, protect = { record.state_dir } })
  end
  return true
end }

flow.STEPS = STEPS

-- flow.verify_definition(ctx, def) -> { finding, ... }: what `systemd-analyze verify` says about
-- the unit's own files (its lines that name one of them; other units' problems are not this
-- service's), or the verifier's failure itself. Empty: nothing found.
function flow.verify_definition(ctx, def, hfs)
  local unit_file
  local ours = {}
  for _, f in ipairs(def.current) do
    ours[#ours + 1] = f.path
    if f.role == "unit" then unit_file = f.path end
  end
  if not unit_file then return {} end
  local argv = { "systemd-analyze" }
  if ctx.user then argv[#argv + 1] = "--user" end
  argv[#argv + 1] = "verify"
  argv[#argv + 1] = unit_file
  -- on the unit's host: its systemd reads its files
  local res, _, _, r = (hfs or hostfs.here()).run(argv, { timeout = 60, capture = true })
  local out = res or (type(r) == "table" and r) or nil
  if not out then
    return {} -- no verifier here (not installed): nothing to say, the flow goes on
  end
  local findings = {}
  for line in ((out.stderr or "") .. "\n" .. (out.stdout or "")):gmatch("[^\n]+") do
    for _, path in ipairs(ours) do
      if line:sub(1, #path + 1) == path .. ":" then
        findings[#findings + 1] = line
        break
      end
    end
  end
  if #findings == 0 and not res and out.exit_code and out.exit_code ~= 0 then
    local first = (out.stderr or ""):match("[^\n]+")
    if first and not first:find("RuntimeDirectory", 1, true) then
      findings[1] = ("systemd-analyze verify: %s"):format(first)
    end
  end
  return findings
end

-- flow.hashes(files) -> { [path] = sha256 | false (absent) }
function flow.hashes(files, hfs)
  local fs = hfs or fs
  local out = {}
  for _, f in ipairs(files) do
    out[f.path] = fs.sha256(f.path) or false
  end
  return out
end

-- flow.changed_files(files, hashes) -> { "changed PATH", ... }: which of the files differ from
-- the hashes taken earlier.
function flow.changed_files(files, hashes, hfs)
  local fs = hfs or fs
  local out = {}
  if not hashes then return out end
  for _, f in ipairs(files) do
    local before = hashes[f.path]
    if before ~= nil and (fs.sha256(f.path) or false) ~= before then
      out[#out + 1] = "changed " .. f.path
    end
  end
  return out
end

-- Would a rollback after apply have anything to undo besides restarting the unit? Not when no
-- code was deployed, no migration ran and the definition is the known good one: then the apply
-- record need not survive a power cut (journal.durable), which saves two fsyncs per service.
function Run:apply_has_undo()
  local def = self.def
  return not (def and def.known and not def.changed and not def.stale
    and not self.touched.deploy and not self.touched.migrated)
end

function Run:go()
  self:emit("SERVICE_RESTART_START", {})
  local force = self.ctx.opts.force
  for _, st in ipairs(STEPS) do
    if not (st.skip_with_force and force) and (not st.when or st.when(self)) then
      -- the journal first: what is announced has been recorded
      local fields = { phase = st.name }
      if st.name == "apply" then fields.undo = self:apply_has_undo() end
      self:journal(fields)
      if st.shows_own_steps then self.current_step = st.name else self:step(st.name) end
      local ok, reason = st.fn(self)
      if not ok then
        return self:fail(reason)
      end
    end
  end
  self:emit("SERVICE_RESTART_SUCCESS", { method = self.method, duration_ms = ms(rr.now() - self.t0) })
  self:hook("on_success", self.svc, { method = self.method })
  return flow.SUCCESS, nil, { method = self.method, deploy_record = self.touched.deploy }
end

flow.is_cancel = rr.is_cancel

local function new_run(ctx, svc)
  local place = flow.place(ctx, svc)
  local unit, err
  if place.manager then
    unit, err = place.manager:unit(svc.unit)
  else
    err = place.error or ("host " .. tostring(svc.host) .. " cannot be reached")
  end
  return setmetatable({ ctx = ctx, svc = svc, t0 = rr.now(), unit = unit, touched = {}, manager = place.manager,
    fs = place.fs, state_root = place.state_root, snaps = snapshot.on(place.fs), deploys = deploy.on(place.fs) },
    Run), err
end

-- flow.run(ctx, svc) -> outcome, error, info
-- ctx = { manager, events, opts = {force, deploy, deploy_path, skip_migrations,
--         accept_unknown_definition}, state_root, user, services_file, run_journal
--         (rr.journal or nil), hooks_for = fn(svc) -> hook set|nil, on_step = fn(svc, step)|nil }
function flow.run(ctx, svc)
  local self, uerr = new_run(ctx, svc)
  if not self.unit then
    self:emit("SERVICE_RESTART_START", {})
    return self:fail("cannot reach the unit: " .. tostring(uerr))
  end
  local ok, outcome, err, info = pcall(Run.go, self)
  if not ok and flow.is_cancel(outcome) then
    -- The task was cancelled (shutdown, os.exit in a hook): no rollback may start now — its
    -- jobs would never be waited for. The run journal keeps what was in flight.
    error(outcome, 0)
  end
  if not ok then
    -- A bug or a hook error surfaced as a Lua error: fail this service (undoing what the steps
    -- touched), keep the engine.
    return self:fail("internal error in step " .. tostring(self.current_step) .. ": " .. tostring(outcome))
  end
  return outcome, err, info
end

-- flow.rollback(ctx, svc, reason, deploy_record|nil) -> true | nil, err, manual_steps
-- A rollback on request (plans/rollback.lua, the REPL, recovery): the known-good definition,
-- and the given deploy undone. A replica is drained first.
local function find_step(name)
  for _, st in ipairs(STEPS) do if st.name == name then return st end end
end

function flow.rollback(ctx, svc, reason, deploy_record)
  local self, uerr = new_run(ctx, svc)
  if not self.unit then
    return nil, "cannot reach the unit: " .. tostring(uerr), {}
  end
  self.touched.deploy = deploy_record
  self.touched.unit = true
  self.record_dir = deploy_record and deploy_record.state_dir
  local props = self.unit:properties()
  if props then
    self.props = props
    self.def = flow.definition_state(ctx, svc, props)
  end
  if self:balancer() then
    -- out of rotation before it stops: its requests in flight end first (a failed canary)
    find_step("drain").fn(self)
  end
  return self:rollback(reason)
end

-- The phases in which the unit itself was touched (a daemon-reload or a job ran).
local UNIT_TOUCHED = { apply = true, verify = true, commit = true, rollback = true }

-- flow.recover(ctx, svc, entry) -> outcome, error, info
-- Resolves one service a killed run left in flight (entry: its run journal entry). A service
-- that had passed its post-check on the new version and is healthy now finishes its flow
-- (stabilization, final check, known good); any other is rolled back: the known-good
-- definition, the deploy undone, migrate_rollback only when the migration had finished. Either
-- way it ends all-new or all-old. Safe to run again after it was itself interrupted.
function flow.recover(ctx, svc, entry)
  local self, uerr = new_run(ctx, svc)
  self:emit("RECOVERY_START", { phase = entry.phase, deploy_record = entry.deploy_record,
    migration = entry.migration, verified = entry.verified or nil })
  local function failed(reason, outcome)
    self:emit("RECOVERY_FAILED", { error = reason, duration_ms = ms(rr.now() - self.t0) })
    return outcome or flow.FAILED, reason
  end
  if not self.unit then return failed("cannot reach the unit: " .. tostring(uerr)) end
  local props, perr = self.unit:properties()
  if not props then return failed("cannot read the unit: " .. tostring(perr)) end
  self.props = props
  self.def = flow.definition_state(ctx, svc, props)
  if entry.deploy_record then
    self.record_dir = entry.deploy_record
    local record = self.deploys.load(entry.deploy_record)
    if record and record.state ~= "undone" then
      self.touched.deploy = record
    elseif not record and self.fs.exists(entry.deploy_record .. "/backup") then
      return failed(("the deploy record %s cannot be read: undo that deploy by hand"):format(entry.deploy_record),
        flow.ROLLBACK_FAILED)
    else
      state.deploy_undone(self.state_root, svc.name, entry.deploy_record, self.fs) -- never started, or undone
    end
  end
  self.touched.migrated = entry.migration == "finished"
  self.touched.unit = UNIT_TOUCHED[entry.phase] or false
  self.touched.drained = entry.drained or nil

  if entry.verified and entry.phase ~= "rollback" then
    self.method = "restart"
    self:step("post-check")
    local ok, err = self:check("recovery")
    if ok then ok, err = self:enable("healthy on the new version after the interruption") end
    if ok then ok, err = self:stabilize() end
    if ok and svc.stabilize > 0 then ok, err = self:check("final") end
    if ok then
      find_step("commit").fn(self)
      self:emit("RECOVERY_SUCCESS", { action = "finished", duration_ms = ms(rr.now() - self.t0) })
      return flow.SUCCESS, nil, { recovered = "finished" }
    end
    self.recovery_reason = "not healthy on the new version after the interruption: " .. tostring(err)
  end
  local reason = self.recovery_reason or ("interrupted in phase " .. tostring(entry.phase))
  if self.touched.unit then
    local ok, err, steps = self:rollback("recovery: " .. reason)
    if not ok then
      local outcome, msg = failed("rollback failed: " .. tostring(err), flow.ROLLBACK_FAILED)
      return outcome, msg, { manual_steps = steps }
    end
    self:emit("RECOVERY_SUCCESS", { action = "rolled_back", duration_ms = ms(rr.now() - self.t0) })
    return flow.FAILED, reason, { recovered = "rolled_back", rolled_back = true }
  end
  -- The unit was never touched: it still runs what it ran; only the code (and a finished
  -- migration) go back.
  if self.touched.migrated then
    if svc.migrate_rollback then
      local res, merr = self:run_command(svc.migrate_rollback, "MIGRATION_ROLLBACK_OUTPUT")
      if not res then return failed("migrate_rollback: " .. tostring(merr), flow.ROLLBACK_FAILED) end
    else
      self:emit("MIGRATION_NOT_UNDONE", {
        note = "migrations are not undone; the old code runs against the migrated database" })
    end
  end
  local ok, err = self:undo_deploy()
  if not ok then return failed(err, flow.ROLLBACK_FAILED) end
  ok, err = self:enable("the unit was never touched")
  if not ok then return failed(err, flow.ROLLBACK_FAILED) end
  local action = entry.deploy_record and "deploy_undone" or "nothing_to_undo"
  self:emit("RECOVERY_SUCCESS", { action = action, duration_ms = ms(rr.now() - self.t0) })
  return flow.FAILED, reason, { recovered = action }
end

-- For flows built from these steps (rr.bluegreen): a run of one unit (as flow.run makes it),
-- and a step of STEPS by name.
flow.new_run = new_run
flow.step = find_step

return flow
