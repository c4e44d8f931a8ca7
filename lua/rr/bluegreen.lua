-- rr.bluegreen: a blue-green release of one service. The service runs as two instances of a
-- template unit (web@blue.service, web@green.service), each with its own working dir, health
-- URL and server at the balancer; one of them takes the traffic (the live colour, recorded in
-- the state directory). A release:
--
--   inspect, pre-check (the live colour), snapshot (the template's known-good definition),
--   deploy (into the IDLE colour's working dir), migrate,
--   bg-start    the idle instance (re)started on the new release, out of rotation
--   bg-verify   post-check and stabilization, with no traffic
--   bg-switch   the idle server set ready, the live one drained (sessions reach 0 or
--               drain_timeout); the new live colour recorded
--   bg-soak     `soak` seconds serving while the old colour keeps running: unit signals,
--               probes, the optional analysis
--   bg-stop-old the old colour stopped
--   commit      the definition becomes known good, the deploy the last good one
--
-- A failure before the switch stops the idle instance and undoes its deploy: nobody noticed.
-- After the switch, traffic goes back to the old colour FIRST (it still runs), then the new
-- one is stopped and undone. Each step is a phase of the run journal; the writes that precede
-- an irreversible step (bg-start, bg-switch, bg-stop-old, rollback) are durable, and
-- bluegreen.recover resolves a release whose engine was killed.
--
-- The per-colour work reuses rr.flow's runs and steps (deploy, migrate, health checks,
-- stabilization, unit jobs, the journal): a colour is handed to them as a service whose unit,
-- working_dir and health are that colour's.
local rr = require("rr")
local health = require("rr.health")
local snapshot = require("rr.snapshot")
local deploy = require("rr.deploy")
local state = require("rr.state")
local flow = require("rr.flow")
local canary = require("rr.canary")
local soak = require("rr.soak")
local fs = require("rr.fs")

local bluegreen = {}

bluegreen.COLOURS = { "blue", "green" }

local function ms(seconds)
  return math.floor(seconds * 1000 + 0.5)
end

-- The other colour.
function bluegreen.other(colour)
  return colour == "blue" and "green" or "blue"
end

-- bluegreen.colour_service(svc, colour) -> the service as rr.flow's steps take it: the
-- colour's unit, working_dir and health; everything else (name, migrate, hooks, timeouts,
-- stabilize) the service's.
function bluegreen.colour_service(svc, colour)
  local c = svc.blue_green[colour]
  local view = {}
  for k, v in pairs(svc) do view[k] = v end
  view.unit, view.working_dir, view.health, view.colour = c.unit, c.working_dir, c.health, colour
  view.reload = false
  return view
end

-- A colour at the balancer, as rr.balancer takes it.
local function member(svc, colour)
  return { name = ("%s (%s)"):format(svc.name, colour), server = svc.blue_green[colour].balancer_server }
end

-- bluegreen.live(manager, root, svc[, user[, hfs]]) -> colour, how | nil, message
-- The live colour: the recorded one; with none recorded (the first release), the only active
-- instance. Two active instances or none: nothing says which one serves, and the message says
-- how to make it clear. manager, root and hfs (rr.hostfs, default this machine's) are those of
-- the service's host (rr.flow.place).
function bluegreen.live(manager, root, svc, user, hfs)
  local recorded, err, code = state.live_colour(root, svc.name, hfs)
  if recorded then return recorded, "recorded" end
  if code ~= "ENOENT" then return nil, ("blue-green service %s: %s"):format(svc.name, tostring(err)) end
  local states, active, inactive = {}, {}, {}
  for _, colour in ipairs(bluegreen.COLOURS) do
    local name = svc.blue_green[colour].unit
    local unit, uerr = manager:unit(name)
    local st = unit and unit:get("ActiveState")
    states[#states + 1] = ("%s is %s"):format(name, st or ("unreadable: " .. tostring(uerr)))
    if st == "active" then active[#active + 1] = name else inactive[#inactive + 1] = name end
  end
  if #active == 1 then
    for _, colour in ipairs(bluegreen.COLOURS) do
      if svc.blue_green[colour].unit == active[1] then return colour, "the only active instance" end
    end
  end
  local sc = user and "systemctl --user" or "systemctl"
  local fix = #active == 0 and ("start the one that serves (%s start %s)"):format(sc, inactive[1])
    or ("stop the one that does not serve (%s stop %s)"):format(sc, active[2])
  return nil, ("blue-green service %s: no live colour recorded and %s: %s"):format(svc.name,
    table.concat(states, ", "), fix)
end

-- The definition both colours share (the template unit file, its drop-ins, the files both
-- name): the known-good snapshot of a blue-green service covers these. An instance's own
-- drop-ins and environment files are per colour (its port) and a release does not change them.
local function shared_files(a, b)
  local in_b = {}
  for _, f in ipairs(flow.definition_files(b)) do in_b[f.path] = true end
  local out = {}
  for _, f in ipairs(flow.definition_files(a)) do
    if in_b[f.path] then out[#out + 1] = f end
  end
  return out
end

-- bluegreen.definition_state(ctx, svc, idle_props, live_props) -> as rr.flow.definition_state:
-- the known-good snapshot of the service's host (rr.flow.place).
function bluegreen.definition_state(ctx, svc, idle_props, live_props)
  local place = flow.place(ctx, svc)
  local snaps = snapshot.on(place.fs)
  local current = shared_files(idle_props, live_props)
  local known = snaps.known_good(place.state_root, svc.name)
  local changes = known and snaps.diff(known, current, { unit = svc.unit }) or {}
  local stale = idle_props.NeedDaemonReload == true or live_props.NeedDaemonReload == true
  return { current = current, known = known, changes = changes, stale = stale,
    changed = stale or #changes > 0, unknown = known == nil and stale }
end

-- bluegreen.explain(p, svc, out, problem, warn): the dry run of a blue-green service (p as
-- rr.dryrun.run's, with bluegreen_balancers): which colour is live, what is deployed and
-- started where, the switch, the soak and the stop, after read-only looks at both instances
-- and the balancer.
function bluegreen.explain(p, svc, out, problem, warn)
  local opts, bg = p.opts, svc.blue_green
  -- the service's host (p.places, as rr.dryrun's): its manager, files and state root
  local pl = p.places and p.places[svc.host or false] or { manager = p.manager, state_root = p.state_root }
  local hfs = pl.fs or fs
  local live, how = bluegreen.live(pl.manager, pl.state_root, svc, opts.user, pl.fs)
  if not live then
    problem(how .. " (the run would refuse, exit 2)")
    return
  end
  local idle = bluegreen.other(live)
  local props = {}
  for _, colour in ipairs(bluegreen.COLOURS) do
    local c = bg[colour]
    local unit, uerr = pl.manager:unit(c.unit)
    local pr, perr = nil, uerr
    if unit then pr, perr = unit:properties() end
    if not pr then
      problem(("cannot read %s: %s"):format(c.unit, tostring(perr)))
    elseif pr.LoadState ~= "loaded" then
      problem(("unit %s is %s"):format(c.unit, tostring(pr.LoadState)))
    else
      props[colour] = pr
      local kind, detail = health.snapshot(unit, c.health)
      out(("     %s: %s, %s, %s (%s)%s"):format(colour, c.unit, pr.ActiveState, kind, detail,
        colour == live and ("  <- live (" .. how .. ")") or "  (idle)"))
      if colour == live and kind ~= "healthy" and not opts.force then
        problem("the live colour is not healthy: the pre-check would fail and nothing would be touched")
      end
    end
  end
  local b = p.bluegreen_balancers and p.bluegreen_balancers[svc.name]
  if b then
    for _, colour in ipairs(bluegreen.COLOURS) do
      local st, berr = b:state(member(svc, colour))
      if not st then
        problem(("cannot reach the balancer (%s): %s"):format(b:describe(), tostring(berr)))
        break
      end
      out(("     balancer: %s at %s is %s, %s session(s)"):format(bg[colour].balancer_server, b:describe(),
        tostring(st.admin), tostring(st.sessions)))
      if colour == live and st.admin == "maint" then
        problem(("the live colour's server %s is in maintenance (set outside this run): not touched"):format(
          bg[colour].balancer_server))
      end
    end
  end
  if props.blue and props.green then
    local def = bluegreen.definition_state({ state_root = pl.state_root, hosts = p.places }, svc, props[idle],
      props[live])
    if def.known then
      out(("     rollback restores: the known-good definition of the template (run %s)"):format(tostring(def.known.run)))
    elseif def.unknown then
      warn("the template's definition changed on disk and there is no known-good snapshot: the run refuses without "
        .. "--accept-unknown-definition")
    end
    for _, c in ipairs(def.changes) do out(("     definition %s: %s"):format(c.change, c.path)) end
    if def.stale then out("     daemon-reload first (the template changed on disk)") end
  end
  local steps = {}
  if not opts.force then steps[#steps + 1] = ("pre-check the live colour %s"):format(live) end
  if opts.deploy then
    steps[#steps + 1] = ("deploy: rsync -a %s/ -> %s/ (the idle colour %s; undone on rollback)"):format(
      opts.deploy_path, bg[idle].working_dir, idle)
  else
    steps[#steps + 1] = ("same release: rsync -a %s/ -> %s/ (the live colour's code into the idle colour %s, which "
      .. "still holds the release before it; undone on rollback)"):format(bg[live].working_dir, bg[idle].working_dir,
      idle)
  end
  if not hfs.stat(bg[idle].working_dir, true) then problem(("working_dir %s does not exist"):format(bg[idle].working_dir)) end
  if svc.migrate then
    steps[#steps + 1] = opts.skip_migrations and "migrate: skipped (--skip-migrations)"
      or ("migrate: %s (in %s; not undone on rollback)"):format(table.concat(svc.migrate, " "), bg[idle].working_dir)
  end
  steps[#steps + 1] = ("start %s (restart if it runs) with no traffic%s"):format(bg[idle].unit,
    opts.force and "" or (", post-check %s, stabilize %gs"):format(bg[idle].health.url, svc.stabilize))
  steps[#steps + 1] = ("switch: %s ready, %s drained (sessions to 0, at most %gs); %s recorded live"):format(
    bg[idle].balancer_server, bg[live].balancer_server, bg.drain_timeout, idle)
  if not opts.force and bg.soak > 0 then
    steps[#steps + 1] = ("soak %gs with the traffic while %s keeps running%s (a failure switches back to %s)")
      :format(bg.soak, bg[live].unit, bg.analysis and (", analysis " .. bg.analysis) or "", live)
  end
  steps[#steps + 1] = ("stop the old colour %s"):format(bg[live].unit)
  for i, step in ipairs(steps) do out(("     %d) %s"):format(i, step)) end
end

-- ---- the soak ----

local function describe(view)
  return { name = view.name, colour = view.colour, unit = view.unit, url = view.health and view.health.url,
    server = view.blue_green[view.colour].balancer_server }
end

-- bluegreen.soak{ svc =, new = run of the new colour, old = run of the old colour, seconds =,
--   analysis = fn|nil } -> true | nil, reason
-- The new colour serves for `seconds`: its unit must stay active with the same main process
-- and restart count, its probe healthy, and the analysis (called about every quarter of the
-- soak, at most every 5 s, and once more at its end) must return true.
function bluegreen.soak(args)
  local new = args.new
  local s = soak.new(args.seconds)
  local ok, why = s:unit(new.unit, new.svc.unit)
  if not ok then return nil, why end
  s:probe(new.svc.health, new.svc.unit)
  if args.analysis then
    s:analysis(args.analysis, { service = args.svc.name, soak = args.seconds, live = describe(new.svc),
      previous = describe(args.old.svc) })
  end
  return s:run("the soak")
end

-- ---- a release ----

local Release = {}
Release.__index = Release

local function new_release(ctx, svc, live, idle)
  local L, lerr = flow.new_run(ctx, bluegreen.colour_service(svc, live))
  local I, ierr = flow.new_run(ctx, bluegreen.colour_service(svc, idle))
  local self = setmetatable({ ctx = ctx, svc = svc, bg = svc.blue_green, live = live, idle = idle, L = L, I = I,
    b = ctx.bluegreen_balancers and ctx.bluegreen_balancers[svc.name], t0 = rr.now() }, Release)
  return self, (not L.unit and lerr) or (not I.unit and ierr) or nil
end

-- An event of the release (service, and the template unit).
function Release:emit(name, fields)
  fields = fields or {}
  fields.service = fields.service or self.svc.name
  fields.unit = fields.unit or self.svc.unit
  return self.ctx.events:emit(name, fields)
end

function Release:journal(fields)
  self.I:journal(fields)
end

function Release:describe_balancer()
  return self.b and self.b:describe() or "no balancer"
end

-- Puts a colour in rotation -> true | nil, message.
function Release:enable(colour, why)
  local m = member(self.svc, colour)
  local ok, err = self.b:enable(m)
  local run = colour == self.idle and self.I or self.L
  if not ok then
    run:emit("BALANCER_FAILED", { action = "enable", server = m.server, error = err })
    return nil, ("cannot put %s in rotation at %s: %s"):format(m.server, self.b:describe(), tostring(err))
  end
  run:emit("BALANCER_ENABLE", { server = m.server, balancer = self.b:describe(), reason = why })
  return true
end

-- Takes a colour out of rotation and waits for its sessions to end -> true | nil, message.
function Release:drain(colour, why)
  local m = member(self.svc, colour)
  local run = colour == self.idle and self.I or self.L
  local t0 = rr.now()
  local ok, err = self.b:drain(m)
  if not ok then
    run:emit("BALANCER_FAILED", { action = "drain", server = m.server, error = err })
    return nil, ("cannot drain %s at %s: %s"):format(m.server, self.b:describe(), tostring(err))
  end
  local drained, derr = self.b:wait_drained(m, self.bg.drain_timeout)
  local left
  if not drained then
    local st = self.b:state(m)
    left = st and st.sessions or nil
  end
  run:emit("BALANCER_DRAIN", { server = m.server, balancer = self.b:describe(), duration_ms = ms(rr.now() - t0),
    sessions_left = left, timed_out = not drained or nil, note = not drained and tostring(derr) or nil, reason = why })
  return true
end

-- Traffic back on the old colour, which must still serve (one look: active and healthy) ->
-- true | nil, message. The old colour first in rotation, then the new one out.
function Release:switch_back()
  local kind, detail = health.snapshot(self.L.unit, self.L.svc.health)
  if kind ~= "healthy" then
    return nil, ("cannot switch back: the old colour %s (%s) is %s (%s); traffic stays on %s"):format(self.live,
      self.L.svc.unit, kind, tostring(detail), self.idle)
  end
  local t0 = rr.now()
  local ok, err = self:enable(self.live, "switch back: the old release takes the traffic again")
  if not ok then return nil, err end
  ok, err = self:drain(self.idle, "switch back")
  if not ok then return nil, err end
  ok, err = state.set_live_colour(self.I.state_root, self.svc.name, self.live, self.I.fs)
  if not ok then
    self:emit("WARNING", { warning = ("cannot record %s as the live colour again: %s"):format(self.live, tostring(err)) })
  end
  self:emit("BLUEGREEN_SWITCHED", { from = self.idle, to = self.live, back = true,
    duration_ms = ms(rr.now() - t0) })
  self.switched = false
  self:journal({ switched = false })
  return true
end

-- What an operator types when a rollback failed.
function Release:manual_steps()
  local sc = self.ctx.user and "systemctl --user" or "systemctl"
  local steps = {}
  local idle_server = self.bg[self.idle].balancer_server
  local live_server = self.bg[self.live].balancer_server
  if self.b and self.b.kind == "haproxy" then
    local hp = self.b.hp
    steps[#steps + 1] = ("# once %s serves again: echo 'set server %s/%s state ready' | socat stdio %s"):format(
      self.L.svc.unit, hp.backend, live_server, hp.socket)
    steps[#steps + 1] = ("echo 'set server %s/%s state drain' | socat stdio %s"):format(hp.backend, idle_server,
      hp.socket)
  else
    steps[#steps + 1] = ("# at %s: %s in rotation, %s out"):format(self:describe_balancer(), live_server, idle_server)
  end
  steps[#steps + 1] = ("%s stop %s"):format(sc, self.I.svc.unit)
  -- the colour that serves is the live one: a next release must not deploy into it
  steps[#steps + 1] = ("echo %s > %s   # %s is the live colour again"):format(self.live,
    flow.shell_quote(("%s/bluegreen/%s.live"):format(tostring(self.I.state_root):gsub("/+$", ""), self.svc.name)),
    self.live .. (self.svc.host and (" (on host %s)"):format(self.svc.host) or ""))
  if self.I.touched.deploy then
    steps[#steps + 1] = ("rrengine plans/rollback.lua%s --service %s --deploy-record %s   # undo the code deploy"):format(
      self.ctx.user and " --user" or "", self.svc.name, flow.shell_quote(self.I.touched.deploy.state_dir or "?"))
  end
  return steps
end

-- The rollback of a release: traffic back on the old colour first when it had switched; then
-- the new colour stopped, the down-migration, the known-good definition of the template, the
-- deploy undone, daemon-reload. The old colour is never stopped or restarted here.
function Release:rollback(reason)
  local I = self.I
  I:journal({ phase = "rollback" })
  I:step("rollback")
  local t0 = rr.now()
  I:emit("ROLLBACK_START", { reason = reason, switch_back = self.switched or nil,
    migrations_not_undone = I.touched.migrated and not self.svc.migrate_rollback or nil })
  local problems = {}
  local function problem(msg) problems[#problems + 1] = msg end
  if self.switched then
    local ok, err = self:switch_back()
    if not ok then
      -- the new colour keeps the traffic: stopping it now would take the service down
      local steps = self:manual_steps()
      I:emit("ROLLBACK_FAILED", { duration_ms = ms(rr.now() - t0), reason = reason, error = err, manual_steps = steps })
      return nil, err, steps
    end
  end
  local ok, err = I:job("stop")
  if not ok then problem("stop: " .. tostring(err)) end
  if I.touched.migrated then
    if self.svc.migrate_rollback then
      I:emit("MIGRATION_ROLLBACK_START", { command = self.svc.migrate_rollback })
      local res, merr, _, r = I:run_command(self.svc.migrate_rollback, "MIGRATION_ROLLBACK_OUTPUT")
      I:emit("MIGRATION_ROLLBACK_END", { exit_code = (res or r or {}).exit_code, error = not res and merr or nil })
      if not res then problem("migrate_rollback: " .. tostring(merr)) end
    else
      I:emit("MIGRATION_NOT_UNDONE", { note = "migrations are not undone; the old code runs against the migrated database" })
    end
  end
  local def = self.def
  local reload = def and def.stale
  if def and def.known then
    local ip, lp = I.unit:properties(), self.L.unit:properties()
    local current = (ip and lp) and shared_files(ip, lp) or def.current
    local restored, rerr = I.snaps.restore(def.known, current, { unit = self.svc.unit })
    if restored then
      if #restored.restored > 0 or #restored.removed > 0 then reload = true end
      I:emit("DEFINITION_RESTORED", { restored = restored.restored, removed = restored.removed,
        manual = restored.manual, snapshot = def.known.dir })
    else
      problem("restore definition: " .. tostring(rerr))
    end
  elseif def and def.changed then
    problem("no known-good definition to restore")
  end
  ok, err = I:undo_deploy()
  if not ok then problem(err) end
  if reload then
    ok, err = I:daemon_reload()
    if not ok then problem("daemon-reload: " .. tostring(err)) end
  end
  I.unit:reset_failed()
  I:hook("on_rollback", self.svc, { reason = reason, ok = #problems == 0 })
  if #problems == 0 then
    I:emit("ROLLBACK_SUCCESS", { duration_ms = ms(rr.now() - t0), reason = reason })
    return true
  end
  local steps = self:manual_steps()
  I:emit("ROLLBACK_FAILED", { duration_ms = ms(rr.now() - t0), reason = reason, error = table.concat(problems, "; "),
    manual_steps = steps })
  return nil, table.concat(problems, "; "), steps
end

-- Ends a release with a failure, undoing what it did.
function Release:fail(reason)
  local I = self.I
  if I.veto then
    I:emit("SERVICE_SKIPPED", { reason = I.veto })
    return flow.FAILED, I.veto, { touched = false, vetoed = true }
  end
  local touched = I.touched.unit or self.switched
  local rolled_back, problem, steps
  if touched then
    local ok, err, s = self:rollback(reason)
    rolled_back, problem, steps = ok and true or false, err, s
  elseif I.touched.deploy then
    local ok, err = I:undo_deploy()
    if not ok then
      problem, steps = err, self:manual_steps()
      I:emit("ROLLBACK_FAILED", { reason = reason, error = problem, manual_steps = steps })
    end
  end
  if self.started then
    self:emit("BLUEGREEN_FAILED", { live = self.live, idle = self.idle, error = reason,
      stage = self.reached_switch and "after the switch" or "before the switch" })
  end
  local fields = { error = reason, rollback_error = problem, duration_ms = ms(rr.now() - self.t0) }
  if touched then fields.rolled_back = rolled_back else fields.touched = false end
  I:emit("SERVICE_RESTART_FAILED", fields)
  I:hook("on_failure", self.svc, reason)
  if problem then
    return flow.ROLLBACK_FAILED, reason .. "; rollback failed: " .. problem, { manual_steps = steps }
  end
  if rolled_back then return flow.FAILED, reason, { rolled_back = true } end
  return flow.FAILED, reason, { touched = false }
end

-- commit: the template's definition is known good, the deploy the last good one.
function Release:commit()
  local ctx, svc, I = self.ctx, self.svc, self.I
  if ctx.opts.force then
    I:emit("WARNING", { warning = "--force: the definition was not health-checked, so it does not become the known good one" })
  elseif not (self.def and self.def.known and not self.def.changed) then
    local ip, lp = I.unit:properties(), self.L.unit:properties()
    local files = (ip and lp) and shared_files(ip, lp) or (self.def and self.def.current) or {}
    local snap, serr = I.snaps.capture(I.state_root, svc.name, files, { run = ctx.events.run, unit = svc.unit })
    if snap then snap, serr = I.snaps.promote(I.state_root, svc.name, snap) end
    if not snap then
      I:emit("WARNING", { warning = "cannot record the known-good snapshot: " .. tostring(serr) })
    end
  end
  local record = I.touched.deploy
  if record then
    state.deploy_commit(I.state_root, svc.name, I.record_dir or record.state_dir, I.fs)
    I.deploys.prune(I.state_root, svc.name, { keep = deploy.KEEP, protect = { record.state_dir } })
  end
  return true
end

local STEPS = {}

-- inspect: both instances loaded, the balancer answers for both servers, the live one is not
-- in maintenance, and the before_restart hooks agree.
STEPS[#STEPS + 1] = { name = "inspect", fn = function(self)
  for _, run in ipairs({ self.L, self.I }) do
    local props, perr = run.unit:properties()
    if not props then return nil, ("cannot read %s: %s"):format(run.svc.unit, tostring(perr)) end
    if props.LoadState ~= "loaded" then return nil, ("unit %s is %s"):format(run.svc.unit, tostring(props.LoadState)) end
    run.props = props
  end
  if not self.b then return nil, "no balancer for the blue-green service (a bug: it is opened before the run)" end
  for _, colour in ipairs({ self.live, self.idle }) do
    local m = member(self.svc, colour)
    local st, berr = self.b:state(m)
    if not st then return nil, ("cannot read %s at %s: %s"):format(m.server, self.b:describe(), tostring(berr)) end
    if colour == self.live and st.admin == "maint" then
      return nil, ("the live colour's server %s is in maintenance at %s (set outside this run): not touched"):format(
        m.server, self.b:describe())
    end
    if colour == self.idle then self.idle_admin = st.admin end
  end
  local vetoed, why = self.I:hook("before_restart", self.svc)
  if vetoed == false then
    self.I.veto = "vetoed by hook: " .. why
    return nil, self.I.veto
  elseif vetoed == nil then
    return nil, why
  end
  return true
end }

-- pre-check: the live colour serves; an unhealthy one is not touched.
STEPS[#STEPS + 1] = { name = "pre-check", skip_with_force = true, fn = function(self)
  local ok, err = self.L:check("pre")
  if not ok then return nil, ("pre-restart health check of the live colour %s failed: %s"):format(self.live, err) end
  self.prechecked = true
  return true
end }

-- snapshot: the template's known-good definition; on the first release, the one the live
-- colour runs healthy.
STEPS[#STEPS + 1] = { name = "snapshot", fn = function(self)
  local ctx, svc, I = self.ctx, self.svc, self.I
  local def = bluegreen.definition_state(ctx, svc, I.props, self.L.props)
  self.def, I.def = def, def
  if not def.known and self.prechecked and not def.stale then
    local snap, err = I.snaps.capture(I.state_root, svc.name, def.current, { run = ctx.events.run, unit = svc.unit })
    if snap then snap, err = I.snaps.promote(I.state_root, svc.name, snap) end
    if not snap then return nil, "cannot snapshot the unit definition: " .. tostring(err) end
    def.known = snap
    I:emit("SNAPSHOT_KNOWN_GOOD", { snapshot = snap.dir, files = #def.current })
  elseif def.unknown then
    local msg = "the template's definition changed on disk and systemd has not loaded it yet, and there is no "
      .. "known-good snapshot: rollback could not bring back the earlier definition"
    if not (ctx.opts.accept_unknown_definition or ctx.opts.force) then
      return nil, msg .. " (run with --accept-unknown-definition to go on anyway)"
    end
    I:emit("WARNING", { warning = msg })
  end
  if #def.changes > 0 then
    local list = {}
    for _, c in ipairs(def.changes) do list[#list + 1] = c.change .. " " .. c.path end
    I:emit("DEFINITION_CHANGED", { changes = list })
  end
  return true
end }

-- deploy and migrate: rr.flow's own steps, on the idle colour (its working dir).
STEPS[#STEPS + 1] = { name = "deploy", when = function(self) return flow.step("deploy").when(self.I) end,
  fn = function(self) return flow.step("deploy").fn(self.I) end }
STEPS[#STEPS + 1] = { name = "migrate", when = function(self) return flow.step("migrate").when(self.I) end,
  fn = function(self) return flow.step("migrate").fn(self.I) end }

-- bg-start: the idle instance (re)started on the new release, out of rotation.
STEPS[#STEPS + 1] = { name = "bg-start", shows_own_steps = true, fn = function(self)
  local I = self.I
  if self.idle_admin == "ready" then
    -- an idle server in rotation would take requests while its instance restarts
    local ok, err = self:drain(self.idle, "the idle colour leaves the rotation before it starts")
    if not ok then return nil, err end
  end
  if self.def.stale then
    I:step("daemon-reload")
    I.touched.unit = true
    local ok, err = I:daemon_reload()
    if not ok then return nil, "daemon-reload failed: " .. tostring(err) end
  end
  I:step("restart")
  I:emit("UNIT_RESTART", { reason = ("the idle colour %s starts the new release, without traffic"):format(self.idle) })
  I.touched.unit = true
  I.unit:reset_failed()
  local ok, err = I:job("restart")
  I.method = "restart"
  if not ok then return nil, ("start of the idle colour %s failed: %s"):format(self.idle, tostring(err)) end
  local hok, herr = I:hook("after_restart", self.svc, { method = "restart", colour = self.idle })
  if hok == nil then return nil, herr end
  return true
end }

-- bg-verify: post-check, stabilization and final check of the new colour, with no traffic.
STEPS[#STEPS + 1] = { name = "bg-verify", shows_own_steps = true, skip_with_force = true, fn = function(self)
  local I = self.I
  I:step("post-check")
  local ok, err = I:check("post")
  if not ok then return nil, ("the idle colour %s is unhealthy on the new release: %s"):format(self.idle, err) end
  I:journal({ verified = true })
  ok, err = I:stabilize()
  if not ok then return nil, ("the idle colour %s is unstable on the new release: %s"):format(self.idle, err) end
  if self.svc.stabilize > 0 then
    I:step("final-check")
    ok, err = I:check("final")
    if not ok then return nil, "final health check failed: " .. err end
  end
  return true
end }

-- bg-switch: the new colour in rotation, then the old one drained; the new live colour recorded.
STEPS[#STEPS + 1] = { name = "bg-switch", journal = { switched = true }, fn = function(self)
  local t0 = rr.now()
  self.switched, self.reached_switch = true, true
  self.I:step("switch")
  local ok, err = self:enable(self.idle, "the switch: the new release takes the traffic")
  if not ok then return nil, err end
  ok, err = self:drain(self.live, "the switch: the old release leaves the rotation")
  if not ok then return nil, err end
  ok, err = state.set_live_colour(self.I.state_root, self.svc.name, self.idle, self.I.fs)
  if not ok then
    -- a next run would deploy into the colour that serves: the release cannot stand
    return nil, ("cannot record %s as the live colour: %s"):format(self.idle, tostring(err))
  end
  self:emit("BLUEGREEN_SWITCHED", { from = self.live, to = self.idle, duration_ms = ms(rr.now() - t0) })
  return true
end }

-- bg-soak: the new colour serves while the old one keeps running.
STEPS[#STEPS + 1] = { name = "bg-soak", skip_with_force = true, fn = function(self)
  if self.bg.soak <= 0 then return true end
  self.I:step("soak")
  local analysis, aerr
  if self.bg.analysis then
    analysis, aerr = canary.load_analysis(self.bg.analysis)
    if not analysis then return nil, aerr end
  end
  self:emit("BLUEGREEN_SOAK", { live = self.idle, previous = self.live, soak = self.bg.soak })
  local ok, why = bluegreen.soak({ svc = self.svc, new = self.I, old = self.L, seconds = self.bg.soak,
    analysis = analysis })
  if not ok then return nil, "the soak failed: " .. tostring(why) end
  return true
end }

-- bg-stop-old: the old colour stops (it no longer takes traffic).
STEPS[#STEPS + 1] = { name = "bg-stop-old", fn = function(self)
  self.I:step("stop-old")
  local ok, err = self.L:job("stop")
  if not ok then
    -- the new colour serves and soaked: undoing the release for this would be worse
    self.old_running = ("the old colour %s (%s) did not stop: %s; the release stands (%s serves): stop it by hand "
      .. "(%s stop %s)"):format(self.live, self.L.svc.unit, tostring(err), self.idle,
      self.ctx.user and "systemctl --user" or "systemctl", self.L.svc.unit)
    self:emit("WARNING", { warning = self.old_running })
  end
  return true
end }

STEPS[#STEPS + 1] = { name = "commit", fn = function(self) return self:commit() end }

bluegreen.STEPS = STEPS

function Release:go()
  local I = self.I
  I:emit("SERVICE_RESTART_START", { colour = self.idle })
  local force = self.ctx.opts.force
  for _, st in ipairs(STEPS) do
    if not (st.skip_with_force and force) and (not st.when or st.when(self)) then
      local fields = { phase = st.name, blue_green = { live = self.live, idle = self.idle } }
      for k, v in pairs(st.journal or {}) do fields[k] = v end
      self:journal(fields)
      if st.shows_own_steps then I.current_step = st.name else I:step(st.name) end
      local ok, reason = st.fn(self)
      if not ok then return self:fail(reason) end
      if st.name == "snapshot" then
        -- what the release will do is known, nothing is touched yet
        self.started = true
        self:emit("BLUEGREEN_START", { live = self.live, idle = self.idle, live_unit = self.L.svc.unit,
          idle_unit = I.svc.unit, soak = self.bg.soak })
      end
    end
  end
  self:emit("BLUEGREEN_PASSED", { live = self.idle, previous = self.live, duration_ms = ms(rr.now() - self.t0),
    old_running = self.old_running })
  I:emit("SERVICE_RESTART_SUCCESS", { method = "blue-green", colour = self.idle, duration_ms = ms(rr.now() - self.t0),
    warning = self.old_running })
  I:hook("on_success", self.svc, { method = "blue-green", colour = self.idle })
  return flow.SUCCESS, nil, { method = "blue-green", deploy_record = I.touched.deploy, live = self.idle,
    warning = self.old_running }
end

-- bluegreen.run(ctx, svc) -> outcome, error, info: one release of a blue-green service (as
-- rr.flow.run for any other service; ctx as there, with bluegreen_balancers = { [name] = b }).
function bluegreen.run(ctx, svc)
  local place = flow.place(ctx, svc)
  local live, why
  if place.manager then
    live, why = bluegreen.live(place.manager, place.state_root, svc, ctx.user, place.fs)
  else
    why = place.error or ("host " .. tostring(svc.host) .. " cannot be reached")
  end
  if not live then
    ctx.events:emit("SERVICE_RESTART_START", { service = svc.name, unit = svc.unit })
    ctx.events:emit("SERVICE_RESTART_FAILED", { service = svc.name, unit = svc.unit, error = why, touched = false })
    return flow.FAILED, why, { touched = false }
  end
  local self, uerr = new_release(ctx, svc, live, bluegreen.other(live))
  if uerr then
    self.I:emit("SERVICE_RESTART_START", {})
    return self:fail("cannot reach the unit: " .. tostring(uerr))
  end
  local staged -- on another host: this machine's copy of the live release, removed at the end
  local _ <close> = setmetatable({}, { __close = function() if staged then fs.remove_tree(staged) end end })
  if not ctx.opts.deploy then
    -- A restart without a release: the idle colour still holds the release before the live
    -- one, and switching to it as it is would roll the code back. The live colour's release is
    -- copied into it first (rsync, with the same undo record as a deploy), so the restart
    -- serves the same code, with no request lost.
    local source = svc.blue_green[live].working_dir
    if svc.host then
      -- a deploy's source is on this machine: the live release comes here first
      local dir, derr = fs.mkdtemp("/tmp/rrengine-release.")
      if not dir then return self:fail("cannot make a directory for the live release: " .. tostring(derr)) end
      staged = dir
      local argv = require("rr.remote").rsync_argv(svc.host, { "-a" }, source .. "/", dir .. "/",
        { pull = true, ssh_config = place.fs and place.fs.ssh_config })
      local res, rerr = require("rr.proc").run(argv, { timeout = svc.deploy_timeout or 1800 })
      if not res then
        return self:fail(("cannot copy the live release %s from %s: %s"):format(source, svc.host, tostring(rerr)))
      end
      source = dir
    end
    local ictx = setmetatable({}, { __index = ctx })
    ictx.opts = setmetatable({ deploy = true, deploy_path = source }, { __index = ctx.opts })
    self.I.ctx = ictx
  end
  local ok, outcome, err, info = pcall(Release.go, self)
  if not ok and flow.is_cancel(outcome) then error(outcome, 0) end
  if not ok then
    return self:fail("internal error in step " .. tostring(self.I.current_step) .. ": " .. tostring(outcome))
  end
  return outcome, err, info
end

-- The steps of a rollback on request: the previous release still sits in the idle colour's
-- working dir (a release never touches the live colour's), so going back is a release of it.
local ON_REQUEST = { "inspect", "bg-start", "bg-verify", "bg-switch", "bg-stop-old" }

-- bluegreen.rollback(ctx, svc, reason) -> true, warning|nil | nil, message, manual_steps|nil
-- Back to the release before the last one, on request (plans/rollback.lua --service, the
-- REPL's rollback(name)): the idle colour, which still has it, (re)started out of rotation,
-- post-checked and stabilized, then traffic switched to it and the current colour stopped, and
-- the new live colour recorded. Nothing serves differently before the switch; the journal
-- phases are a release's (bg-start, bg-verify, bg-switch, bg-stop-old), so that --recover
-- resolves an interrupted one as it does a release. A failure undoes what was done (traffic
-- back first): manual_steps nil; an undo that failed returns them. ctx as bluegreen.run's.
function bluegreen.rollback(ctx, svc, reason)
  local place = flow.place(ctx, svc)
  local recorded, rerr, rcode = state.live_colour(place.state_root, svc.name, place.fs)
  if not recorded then
    if rcode == "ENOENT" then
      return nil, ("blue-green service %s: no live colour recorded (no release of it finished here): nothing to go "
        .. "back to"):format(svc.name)
    end
    return nil, ("blue-green service %s: %s"):format(svc.name, tostring(rerr))
  end
  local live, idle = recorded, bluegreen.other(recorded)
  if not place.fs.stat(svc.blue_green[idle].working_dir, true) then
    return nil, ("the idle colour %s has no working dir %s: no earlier release to go back to"):format(idle,
      svc.blue_green[idle].working_dir)
  end
  local self, uerr = new_release(ctx, svc, live, idle)
  if uerr then return nil, "cannot reach the unit: " .. tostring(uerr) end
  local I = self.I
  self:emit("BLUEGREEN_START", { live = live, idle = idle, live_unit = self.L.svc.unit, idle_unit = I.svc.unit,
    rollback = true, reason = reason })
  self.started = true
  local steps = {}
  for _, st in ipairs(STEPS) do steps[st.name] = st end
  for _, name in ipairs(ON_REQUEST) do
    local st = steps[name]
    if not (st.skip_with_force and ctx.opts.force) then
      local fields = { phase = name, blue_green = { live = live, idle = idle } }
      for k, v in pairs(st.journal or {}) do fields[k] = v end
      self:journal(fields)
      I.current_step = name
      local ok, why = st.fn(self)
      if not ok then
        local why_all = ("the rollback to %s failed: %s"):format(idle, tostring(why))
        local rok, uerr2, manual = true, nil, nil
        if I.touched.unit or self.switched then rok, uerr2, manual = self:rollback(why_all) end
        self:emit("BLUEGREEN_FAILED", { live = live, idle = idle, error = why_all, rollback = true,
          stage = self.reached_switch and "after the switch" or "before the switch" })
        if not rok then return nil, why_all .. "; undoing it failed: " .. tostring(uerr2), manual or {} end
        return nil, why_all
      end
      if name == "inspect" then
        -- what rr.bluegreen's rollback needs of the definition: the template's, as it is
        self.def = bluegreen.definition_state(ctx, svc, I.props, self.L.props)
        I.def = self.def
      end
    end
  end
  self:emit("BLUEGREEN_PASSED", { live = idle, previous = live, rollback = true, duration_ms = ms(rr.now() - self.t0),
    old_running = self.old_running })
  return true, self.old_running
end

-- The phases after which the idle instance was touched, and those after which the old colour
-- was being stopped (the release is then finished, never undone).
local TOUCHED = { ["bg-start"] = true, ["bg-verify"] = true, ["bg-switch"] = true, ["bg-soak"] = true,
  ["bg-stop-old"] = true, commit = true, rollback = true }
local FINISHING = { ["bg-stop-old"] = true, commit = true }

-- bluegreen.recover(ctx, svc, entry) -> outcome, error, info
-- A release whose engine was killed: before the switch, the idle instance is stopped and its
-- deploy undone; switched but not finished, traffic goes back to the old colour when it runs
-- healthy (else it is reported and left serving on the new one); once the old colour was being
-- stopped, the release is finished.
function bluegreen.recover(ctx, svc, entry)
  local colours = entry.blue_green
  if type(colours) ~= "table" or not svc.blue_green[colours.live or ""] or not svc.blue_green[colours.idle or ""] then
    local why = "the run journal does not say which colour was live: check both instances and the balancer by hand, "
      .. "then --abandon"
    ctx.events:emit("RECOVERY_FAILED", { service = svc.name, unit = svc.unit, error = why })
    return flow.ROLLBACK_FAILED, why
  end
  local self, uerr = new_release(ctx, svc, colours.live, colours.idle)
  local I = self.I
  self:emit("RECOVERY_START", { phase = entry.phase, deploy_record = entry.deploy_record, migration = entry.migration,
    live = colours.live, idle = colours.idle, switched = entry.switched or nil })
  local function failed(reason, outcome, extra)
    self:emit("RECOVERY_FAILED", { error = reason, duration_ms = ms(rr.now() - self.t0) })
    return outcome or flow.FAILED, reason, extra
  end
  if uerr then return failed("cannot reach the unit: " .. tostring(uerr), flow.ROLLBACK_FAILED) end
  if not self.b then return failed("no balancer for the blue-green service", flow.ROLLBACK_FAILED) end
  local ip, lp = I.unit:properties(), self.L.unit:properties()
  if not (ip and lp) then return failed("cannot read the instances", flow.ROLLBACK_FAILED) end
  I.props, self.L.props = ip, lp
  self.def = bluegreen.definition_state(ctx, svc, ip, lp)
  I.def = self.def
  if entry.deploy_record then
    I.record_dir = entry.deploy_record
    local record = I.deploys.load(entry.deploy_record)
    if record and record.state ~= "undone" then
      I.touched.deploy = record
    elseif not record and I.fs.exists(entry.deploy_record .. "/backup") then
      return failed(("the deploy record %s cannot be read: undo that deploy by hand"):format(entry.deploy_record),
        flow.ROLLBACK_FAILED)
    else
      state.deploy_undone(I.state_root, svc.name, entry.deploy_record, I.fs)
    end
  end
  I.touched.migrated = entry.migration == "finished"
  I.touched.unit = TOUCHED[entry.phase] or false
  self.switched = entry.switched == true
  self.reached_switch = self.switched

  if FINISHING[entry.phase] then
    -- the new colour had soaked: it serves; the old one stops
    local ok, err = self:enable(self.idle, "recovery: the release had passed its soak")
    if ok then ok, err = state.set_live_colour(I.state_root, svc.name, self.idle, I.fs) end
    if not ok then return failed(tostring(err), flow.ROLLBACK_FAILED, { manual_steps = self:manual_steps() }) end
    local sok, serr = self.L:job("stop")
    if not sok then
      self:emit("WARNING", { warning = ("the old colour %s did not stop: %s"):format(self.live, tostring(serr)) })
    end
    self:commit()
    self:emit("BLUEGREEN_PASSED", { live = self.idle, previous = self.live, recovered = true })
    self:emit("RECOVERY_SUCCESS", { action = "finished", duration_ms = ms(rr.now() - self.t0) })
    return flow.SUCCESS, nil, { recovered = "finished" }
  end
  local reason = ("interrupted in phase %s"):format(tostring(entry.phase))
  if I.touched.unit or self.switched then
    local ok, err, steps = self:rollback("recovery: " .. reason)
    if not ok then
      return failed("rollback failed: " .. tostring(err), flow.ROLLBACK_FAILED, { manual_steps = steps })
    end
    self:emit("BLUEGREEN_FAILED", { live = self.live, idle = self.idle, error = "recovery: " .. reason,
      stage = self.reached_switch and "after the switch" or "before the switch" })
    self:emit("RECOVERY_SUCCESS", { action = self.reached_switch and "switched_back" or "rolled_back",
      duration_ms = ms(rr.now() - self.t0) })
    return flow.FAILED, reason, { recovered = "rolled_back", rolled_back = true }
  end
  -- the idle instance was never touched: only the code (and a finished migration) go back
  if I.touched.migrated then
    if svc.migrate_rollback then
      local res, merr = I:run_command(svc.migrate_rollback, "MIGRATION_ROLLBACK_OUTPUT")
      if not res then return failed("migrate_rollback: " .. tostring(merr), flow.ROLLBACK_FAILED) end
    else
      I:emit("MIGRATION_NOT_UNDONE", { note = "migrations are not undone; the old code runs against the migrated database" })
    end
  end
  local ok, err = I:undo_deploy()
  if not ok then return failed(err, flow.ROLLBACK_FAILED) end
  local action = entry.deploy_record and "deploy_undone" or "nothing_to_undo"
  self:emit("RECOVERY_SUCCESS", { action = action, duration_ms = ms(rr.now() - self.t0) })
  return flow.FAILED, reason, { recovered = action }
end

return bluegreen
