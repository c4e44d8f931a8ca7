-- The restart flow of one service (DESIGN.md, "The restart flow of one service"):
-- pre-check, known-good snapshot, deploy, migrations, daemon-reload, reload or restart,
-- post-check, stabilization, success — and rollback when the new version is not healthy.
local rr = require("rr")
local proc = require("rr.proc")
local fs = require("rr.fs")
local health = require("rr.health")
local snapshot = require("rr.snapshot")
local deploy = require("rr.deploy")

local flow = {}

-- Outcomes of flow.run: the runner turns them into the summary and the exit code.
flow.SUCCESS = "success"
flow.FAILED = "failed"             -- not touched, or failed and rolled back
flow.ROLLBACK_FAILED = "rollback_failed"

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
function flow.unlisted_dropins(svc, props, user)
  local listed, found, seen = {}, {}, {}
  for _, p in ipairs(props.DropInPaths or {}) do listed[p] = true end
  -- beside the unit file, and where an operator drops overrides (systemctl edit writes to
  -- /etc/systemd/system or ~/.config/systemd/user even for a unit file under /usr/lib)
  local dirs = {}
  local fragment = props.FragmentPath
  if fragment and fragment ~= "" then dirs[#dirs + 1] = fragment:match("^(.*)/[^/]+$") end
  if user then
    local config = os.getenv("XDG_CONFIG_HOME")
    if not config or config == "" then config = (os.getenv("HOME") or "") .. "/.config" end
    dirs[#dirs + 1] = config .. "/systemd/user"
    if os.getenv("XDG_RUNTIME_DIR") then dirs[#dirs + 1] = os.getenv("XDG_RUNTIME_DIR") .. "/systemd/user" end
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
  local unlisted = flow.unlisted_dropins(svc, props, ctx.user)
  for _, path in ipairs(unlisted) do
    current[#current + 1] = { path = path, role = "dropin" }
  end
  local known = snapshot.known_good(ctx.state_root, svc.name)
  local changes = known and snapshot.diff(known, current, { unit = svc.unit }) or {}
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
  -- start_timeout / stop_timeout bound how long we wait for the job (systemd's own timeouts
  -- still apply inside it); nil waits as long as systemd takes.
  local timeout = method == "stop" and self.svc.stop_timeout or self.svc.start_timeout
  local ok, err, job_result, unit_result = self.unit[method](self.unit, "replace", timeout and { timeout = timeout } or nil)
  local fields = { method = method, duration_ms = ms(rr.now() - t0) }
  if ok then
    fields.result = err
    self:emit("UNIT_JOB_DONE", fields)
    return true
  end
  fields.error, fields.job_result, fields.unit_result = err, job_result, unit_result
  self:emit("UNIT_JOB_FAILED", fields)
  return nil, err
end

function Run:daemon_reload()
  local ok, err = self.ctx.manager:daemon_reload()
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
  local base = self.unit:properties()
  if not base or base.ActiveState ~= "active" then
    return nil, "unit is " .. (base and base.ActiveState or "unknown") .. " at the start of stabilization"
  end
  local deadline = rr.now() + secs
  local failure
  local watcher, prober
  watcher = rr.spawn(function()
    -- compared with base, not with the moment the wait starts: nothing slips in between
    local p, err = self.unit:wait_change({ "ActiveState", "MainPID", "NRestarts" }, secs, base)
    if not p then
      if err ~= "timeout" then failure = failure or ("cannot watch the unit: " .. tostring(err)) end
      if prober and failure then prober:cancel() end
      return -- timeout: it stayed put
    end
    if p.ActiveState ~= "active" then
      failure = failure or ("unit left active (" .. tostring(p.ActiveState) .. ")")
    elseif (p.NRestarts or 0) > (base.NRestarts or 0) then
      failure = failure or ("unit restarted by systemd (NRestarts %d -> %d)"):format(base.NRestarts or 0, p.NRestarts)
    else
      failure = failure or ("main process changed (MainPID %s -> %s)"):format(tostring(base.MainPID), tostring(p.MainPID))
    end
    if prober then prober:cancel() end
  end)
  local hc = self.svc.health
  if hc.kind == "http" then
    prober = rr.spawn(function()
      while rr.now() < deadline do
        rr.sleep(math.min(hc.interval, math.max(deadline - rr.now(), 0)))
        if rr.now() >= deadline then return end
        local kind, detail = health.probe(hc, math.min(math.max(hc.interval, 1), 5))
        if kind ~= "healthy" then
          failure = failure or ("probe failed during stabilization: " .. detail)
          watcher:cancel()
          return
        end
      end
    end)
  end
  rr.wait(watcher)
  if prober then rr.wait(prober) end
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
  local steps = { ("%s stop %s"):format(sc, unit) }
  if self.deploy_record then
    steps[#steps + 1] = ("undo the code deploy: rrengine plans/rollback.lua%s --service %s --deploy-record %s")
      :format(self.ctx.user and " --user" or "", self.svc.name, self.deploy_record.state_dir or "?")
  end
  local known = self.def and self.def.known
  if known then
    for _, f in ipairs(known.files or {}) do
      local own = f.role ~= "dropin" or snapshot.dropin_scope(f.path, self.svc.unit) == "own"
      if not own then
        steps[#steps + 1] = ("check by hand: %s is shared with other units (known-good copy: %s/%s)")
          :format(f.path, known.dir, tostring(f.stored))
      elseif f.absent then
        steps[#steps + 1] = ("rm -f %s"):format(f.path)
      elseif f.stored then
        steps[#steps + 1] = ("cp -p %s/%s %s"):format(known.dir, f.stored, f.path)
      end
    end
    for _, c in ipairs(self.def.changes or {}) do
      if c.change == "added" and not c.shared then
        steps[#steps + 1] = ("rm %s   # added since the last known good"):format(c.path)
      end
    end
  end
  steps[#steps + 1] = ("%s daemon-reload && %s reset-failed %s && %s start %s"):format(sc, sc, unit, sc, unit)
  steps[#steps + 1] = ("journalctl %s-u %s -n 50"):format(self.ctx.user and "--user " or "", unit)
  return steps
end

-- Rollback, in the order that keeps each step meaningful: stop; the down-migration while the
-- new code (which ships it) is still in place; the known-good definition; the code deploy
-- undone; daemon-reload; reset-failed (a unit that hit its start limit while flapping must be
-- startable again); start; health check.
function Run:rollback(reason)
  self:step("rollback")
  local t0 = rr.now()
  self:emit("ROLLBACK_START", { reason = reason,
    migrations_not_undone = self.migrated and not self.svc.migrate_rollback or nil })
  local problems = {}
  local function problem(msg) problems[#problems + 1] = msg end

  local ok, err = self:job("stop")
  if not ok then problem("stop: " .. err) end

  if self.migrated then
    if self.svc.migrate_rollback then
      self:emit("MIGRATION_ROLLBACK_START", { command = self.svc.migrate_rollback })
      local res, merr, r = self:run_command(self.svc.migrate_rollback, "MIGRATION_ROLLBACK_OUTPUT")
      self:emit("MIGRATION_ROLLBACK_END", { exit_code = (res or r or {}).exit_code, error = not res and merr or nil })
      if not res then problem("migrate_rollback: " .. tostring(merr)) end
    else
      self:emit("MIGRATION_NOT_UNDONE", {
        note = "migrations are not undone; the old code runs against the migrated database" })
    end
  end

  if self.def and self.def.known then
    local props = self.unit:properties() or {}
    local current = flow.definition_files(props)
    for _, path in ipairs(flow.unlisted_dropins(self.svc, props, self.ctx.user)) do
      current[#current + 1] = { path = path, role = "dropin" }
    end
    -- Files the known-good had that systemd no longer lists (a drop-in removed since) come
    -- back too: restore works on the union of both lists.
    local restored, rerr = snapshot.restore(self.def.known, current, { unit = self.svc.unit })
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
  elseif self.touched_definition then
    problem("no known-good definition to restore")
  end

  if self.deploy_record then
    ok, err = deploy.undo(self.deploy_record)
    if ok then
      self:emit("DEPLOY_UNDONE", { target = self.deploy_record.target })
    else
      problem("undo deploy: " .. tostring(err))
    end
  end

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
  self:hook("on_rollback", self.svc, { reason = reason, ok = #problems == 0 })

  if #problems == 0 then
    -- the deploy is undone and the service healthy: nothing is left unfinished. (After a failed
    -- rollback the pointer stays, so plans/rollback.lua undoes this deploy, not the one before.)
    self:clear_inflight()
    self:emit("ROLLBACK_SUCCESS", { duration_ms = ms(rr.now() - t0), reason = reason })
    return true
  end
  local steps = self:manual_steps()
  self:emit("ROLLBACK_FAILED", { duration_ms = ms(rr.now() - t0), reason = reason,
    error = table.concat(problems, "; "), manual_steps = steps })
  return nil, table.concat(problems, "; "), steps
end

-- The deploy pointers plans/rollback.lua reads: <svc>.inflight names a deploy whose flow has
-- not finished (written before rsync runs; a killed engine leaves it), <svc>.last the last
-- deploy of a successful flow.
-- Drops the .inflight pointer once the deploy it names is undone — only when it names this
-- flow's record (a manual rollback of another record must not lose the unfinished one).
function Run:clear_inflight()
  local record = self.deploy_record or self.inflight_state_dir and { state_dir = self.inflight_state_dir }
  local named = deploy.read_pointer(self.ctx.state_root, self.svc.name, "inflight")
  if record and named == record.state_dir then
    deploy.remove_pointer(self.ctx.state_root, self.svc.name, "inflight")
  end
end

function Run:run_command(argv, output_event)
  return proc.run(argv, {
    cwd = self.svc.working_dir,
    -- a migration killed half-way is worse than a slow one: 30 minutes unless the service says
    timeout = self.svc.migrate_timeout or 1800,
    on_line = function(stream, line)
      self:emit(output_event, { stream = stream, line = line })
    end,
  })
end

-- The service is left in a state only a human can fix: say so everywhere, with the steps.
function Run:rollback_failed(reason, problem)
  local steps = self:manual_steps()
  self:emit("ROLLBACK_FAILED", { reason = reason, error = problem, manual_steps = steps })
  self:emit("SERVICE_RESTART_FAILED", { error = reason, rolled_back = false, rollback_error = problem,
    duration_ms = ms(rr.now() - self.t0) })
  self:hook("on_failure", self.svc, reason)
  return flow.ROLLBACK_FAILED, reason .. "; rollback failed: " .. problem, { manual_steps = steps }
end

-- Ends the flow with a failure. After the unit was touched, rollback decides the outcome.
function Run:fail(reason, touched)
  if touched then
    local ok, err, steps = self:rollback(reason)
    self:emit("SERVICE_RESTART_FAILED", { error = reason, rolled_back = ok and true or false,
      rollback_error = err, duration_ms = ms(rr.now() - self.t0) })
    self:hook("on_failure", self.svc, reason)
    if ok then
      return flow.FAILED, reason, { rolled_back = true }
    end
    return flow.ROLLBACK_FAILED, reason .. "; rollback failed: " .. err, { manual_steps = steps }
  end
  self:emit("SERVICE_RESTART_FAILED", { error = reason, touched = false,
    duration_ms = ms(rr.now() - self.t0) })
  self:hook("on_failure", self.svc, reason)
  return flow.FAILED, reason, { touched = false }
end

function Run:go()
  local ctx, svc, opts = self.ctx, self.svc, self.ctx.opts
  self:emit("SERVICE_RESTART_START", {})

  self:step("inspect")
  local props, perr = self.unit:properties()
  if not props then
    return self:fail("cannot read the unit: " .. tostring(perr))
  end
  if props.LoadState ~= "loaded" then
    return self:fail(("unit %s is %s"):format(svc.unit, tostring(props.LoadState)))
  end

  local vetoed, why = self:hook("before_restart", svc)
  if vetoed == false then
    self:emit("SERVICE_SKIPPED", { reason = "vetoed by hook: " .. why })
    return flow.FAILED, "vetoed by hook: " .. why, { touched = false, vetoed = true }
  elseif vetoed == nil then
    return self:fail(why)
  end

  -- 1. Pre-restart health check: an unhealthy service is not touched.
  local prechecked = false
  if not opts.force then
    self:step("pre-check")
    local ok, err = self:check("pre")
    if not ok then
      return self:fail("pre-restart health check failed: " .. err)
    end
    prechecked = true
  end

  -- 2. The definition: what last worked, and what is on disk now.
  self:step("snapshot")
  local def = flow.definition_state(ctx, svc, props)
  self.def = def
  if not def.known and prechecked and not def.stale then
    -- First run: the files on disk are the ones systemd runs, and they are healthy.
    local snap, err = snapshot.capture(ctx.state_root, svc.name, def.current, { run = ctx.events.run, unit = svc.unit })
    if snap then
      snap, err = snapshot.promote(ctx.state_root, svc.name, snap)
    end
    if not snap then
      return self:fail("cannot snapshot the unit definition: " .. tostring(err))
    end
    def.known = snap
    self:emit("SNAPSHOT_KNOWN_GOOD", { snapshot = snap.dir, files = #def.current })
  elseif def.unknown then
    local msg = "the unit's definition changed on disk and systemd has not loaded it yet"
      .. (props.NeedDaemonReload and " (NeedDaemonReload=yes)" or " (a new drop-in)")
      .. ", and there is no known-good snapshot:"
      .. " rollback could not bring back the earlier definition"
    if not (opts.accept_unknown_definition or opts.force) then
      return self:fail(msg .. " (run with --accept-unknown-definition to go on anyway)")
    end
    self:emit("WARNING", { warning = msg })
  end
  if #def.changes > 0 then
    local list = {}
    for _, c in ipairs(def.changes) do list[#list + 1] = c.change .. " " .. c.path end
    self:emit("DEFINITION_CHANGED", { changes = list })
  end

  -- 3. Deploy the code, recording how to undo it.
  if opts.deploy and svc.working_dir then
    self:step("deploy")
    local t0 = rr.now()
    self:emit("DEPLOY_START", { source = opts.deploy_path, target = svc.working_dir })
    local state_dir = ("%s/runs/%s/%s"):format(ctx.state_root, ctx.events.run, svc.name)
    -- Written before rsync runs: an engine killed from here on leaves a pointer to the record
    -- that undoes it (plans/rollback.lua prefers it over the last finished deploy).
    self.inflight_state_dir = state_dir
    local pok, perr = deploy.write_pointer(ctx.state_root, svc.name, "inflight", state_dir)
    if not pok then
      return self:fail("cannot record the deploy before running it: " .. tostring(perr))
    end
    local record, err, partial = deploy.apply{
      source = opts.deploy_path, target = svc.working_dir, delete = svc.deploy_delete,
      -- rsync's quick check (size + mtime) would skip a changed file of the same size built in
      -- the same second: a release must land whole, so compare contents.
      checksum = true,
      state_dir = state_dir, timeout = svc.deploy_timeout or 1800,
    }
    if not record then
      self:emit("DEPLOY_FAILED", { error = err, duration_ms = ms(rr.now() - t0) })
      if partial and partial.state ~= "undone" then
        -- apply could not undo its own partial deploy: the working dir is half new, half old.
        -- The .inflight pointer stays: plans/rollback.lua finishes this undo, not another.
        self.deploy_record = partial
        return self:rollback_failed("deploy failed: " .. tostring(err), "the partial deploy could not be undone")
      end
      -- apply undid the partial deploy itself (or never started one)
      self:clear_inflight()
      return self:fail("deploy failed (working dir left as it was): " .. tostring(err))
    end
    self.deploy_record = record
    self:emit("DEPLOY_END", { duration_ms = ms(rr.now() - t0),
      created = #(record.created or {}), replaced = #(record.backed_up or {}) })
  end

  -- 4. Migrations: a failure undoes the deploy and fails the service without a restart.
  if svc.migrate and not opts.skip_migrations then
    self:step("migrate")
    local t0 = rr.now()
    self:emit("MIGRATION_START", { command = svc.migrate })
    local res, err, r = self:run_command(svc.migrate, "MIGRATION_OUTPUT")
    local out = res or (type(r) == "table" and r) or {}
    self:emit("MIGRATION_END", { exit_code = out.exit_code, duration_ms = ms(rr.now() - t0),
      error = not res and err or nil })
    if not res then
      if self.deploy_record then
        local ok, uerr = deploy.undo(self.deploy_record)
        if ok then
          self:clear_inflight()
          self:emit("DEPLOY_UNDONE", { target = self.deploy_record.target })
        else
          return self:rollback_failed("migration failed: " .. tostring(err), "undo deploy: " .. tostring(uerr))
        end
      end
      return self:fail("migration failed: " .. tostring(err))
    end
    self.migrated = true
  elseif svc.migrate then
    self:emit("MIGRATION_SKIPPED", { reason = "--skip-migrations" })
  end

  -- 5. Apply: daemon-reload when systemd's copy is stale, then reload or restart.
  self.touched_definition = def.changed
  if def.stale then
    self:step("daemon-reload")
    local ok, err = self:daemon_reload()
    if not ok then
      return self:fail("daemon-reload failed: " .. tostring(err), true)
    end
    props = self.unit:properties() or props
  end
  local method, reason = flow.choose_method(svc, props, def)
  self:step(method)
  self:emit("UNIT_" .. method:upper(), { reason = reason })
  local ok, err = self:job(method)
  if not ok and method == "reload" then
    self:emit("RELOAD_FALLBACK", { error = err })
    method = "restart"
    self:step("restart")
    ok, err = self:job("restart")
  end
  if not ok then
    return self:fail(method .. " failed: " .. err, true)
  end
  local hok, herr = self:hook("after_restart", svc, { method = method })
  if hok == nil then
    return self:fail(herr, true)
  end

  if not opts.force then
    -- 6. Post-restart health check.
    self:step("post-check")
    ok, err = self:check("post")
    if not ok then
      return self:fail("unhealthy after " .. method .. ": " .. err, true)
    end
    -- 7. Stabilization, then a final check.
    ok, err = self:stabilize()
    if not ok then
      return self:fail("unstable after " .. method .. ": " .. err, true)
    end
    if svc.stabilize > 0 then
      self:step("final-check")
      ok, err = self:check("final")
      if not ok then
        return self:fail("final health check failed: " .. err, true)
      end
    end
  end

  -- 8. Success: this definition is now the known-good one — unless --force skipped the checks
  -- that would have shown it works.
  if opts.force then
    self:emit("WARNING", { warning = "--force: the definition was not health-checked, so it does not become the known good one" })
  else
    local cur = self.unit:properties() or props
    local snap, serr = snapshot.capture(ctx.state_root, svc.name, flow.definition_files(cur),
      { run = ctx.events.run, unit = svc.unit })
    if snap then
      snap, serr = snapshot.promote(ctx.state_root, svc.name, snap)
    end
    if not snap then
      self:emit("WARNING", { warning = "cannot record the known-good snapshot: " .. tostring(serr) })
    end
  end
  if self.deploy_record then
    -- the finished deploy becomes the one plans/rollback.lua undoes on request
    deploy.move_pointer(ctx.state_root, svc.name, "inflight", "last")
    -- old deploy backups go; this one, and any unfinished one, stay
    deploy.prune(ctx.state_root, svc.name, { keep = deploy.KEEP, protect = { self.deploy_record.state_dir } })
  end
  self:emit("SERVICE_RESTART_SUCCESS", { method = method, duration_ms = ms(rr.now() - self.t0) })
  self:hook("on_success", svc, { method = method })
  return flow.SUCCESS, nil, { method = method }
end

-- Is this error a task's cancellation (task:cancel(), shutdown, os.exit from a task)?
function flow.is_cancel(err)
  local text = tostring(err)
  return text:match("canceled$") ~= nil or text:match("canceled\nstack traceback") ~= nil
    or text:find("exiting (os.exit(", 1, true) ~= nil
end

-- flow.run(ctx, svc) -> outcome, error, info
-- ctx = { manager, events, opts = {force, deploy, deploy_path, skip_migrations,
--         accept_unknown_definition}, state_root, user, hooks_for = fn(svc) -> hook set|nil,
--         on_step = fn(svc, step)|nil }
function flow.run(ctx, svc)
  local self = setmetatable({ ctx = ctx, svc = svc, t0 = rr.now(), unit = ctx.manager:unit(svc.unit) }, Run)
  local ok, outcome, err, info = pcall(Run.go, self)
  if not ok and flow.is_cancel(outcome) then
    -- The task was cancelled (shutdown, os.exit in a hook): no rollback may start now — its
    -- jobs would never be waited for. The operator reruns or uses plans/rollback.lua.
    error(outcome, 0)
  end
  if not ok then
    -- A bug or a hook error surfaced as a Lua error: fail this service, keep the engine.
    local touched = self.current_step and self.current_step ~= "inspect" and self.current_step ~= "pre-check"
      and self.current_step ~= "snapshot"
    return self:fail("internal error in step " .. tostring(self.current_step) .. ": " .. tostring(outcome),
      touched)
  end
  return outcome, err, info
end

-- flow.rollback(ctx, svc, reason, deploy_record|nil) -> true | nil, err, manual_steps
-- A rollback on request (plans/rollback.lua, the REPL): the known-good definition, and the
-- given deploy undone.
function flow.rollback(ctx, svc, reason, deploy_record)
  local self = setmetatable({ ctx = ctx, svc = svc, t0 = rr.now(), unit = ctx.manager:unit(svc.unit),
    deploy_record = deploy_record }, Run)
  local props = self.unit:properties()
  if props then
    self.def = flow.definition_state(ctx, svc, props)
  end
  return self:rollback(reason)
end

return flow
