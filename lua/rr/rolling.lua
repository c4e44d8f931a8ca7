-- The rolling restart: services in dependency order (several at a time with --parallel, never
-- more), each through rr.flow, with the run lock, the event log, hooks and interruption.
-- plans/rolling.lua is its command line; require("rr").rolling_restart is its Lua API.
local rr = require("rr")
local fs = require("rr.fs")
local services = require("rr.services")
local dag = require("rr.dag")
local hooks = require("rr.hooks")
local events = require("rr.events")
local flow = require("rr.flow")
local state = require("rr.state")
local journal = require("rr.journal")
local balancer = require("rr.balancer")
local health = require("rr.health")
local canary = require("rr.canary")
local bluegreen = require("rr.bluegreen")
local hostfs = require("rr.hostfs")
local hostplaces = require("rr.places")

local rolling = {}

rolling.EXIT_OK = 0
rolling.EXIT_FAILED = 1
rolling.EXIT_USAGE = 2
rolling.EXIT_ROLLBACK_FAILED = 3
rolling.EXIT_UNRESOLVED = 4 -- an earlier run was interrupted and is not resolved
rolling.EXIT_INTERRUPTED = 130

-- Where snapshots, deploy backups and the run lock live, and the default event log (rr.state).
rolling.state_root = state.root
rolling.default_events_file = state.events_file

-- What the summary's per-service detail needs from the run's events (rolling.run hands each
-- event here, whatever the view): the plan's order, the method each flow used, how long it took,
-- why a service was skipped. seen = { order = {names}, by = { [name] = { method, duration_ms, reason } } }
local function note(seen, ev)
  local what, name = ev.event, ev.service
  if what == "PLAN_START" then
    for _, n in ipairs(ev.order or {}) do seen.order[#seen.order + 1] = n end
    return
  end
  if not name then return end
  local d = seen.by[name] or {}
  seen.by[name] = d
  if what == "UNIT_RELOAD" or what == "UNIT_RESTART" then
    d.method = what == "UNIT_RELOAD" and "reload" or "restart"
  elseif what == "RELOAD_FALLBACK" then
    d.method = "restart"
  elseif what == "SERVICE_RESTART_SUCCESS" or what == "SERVICE_RESTART_FAILED" or what == "RECOVERY_SUCCESS"
      or what == "RECOVERY_FAILED" then
    d.method, d.duration_ms = ev.method or d.method, ev.duration_ms
    -- succeeded, with something left for a human (a blue-green old colour that did not stop)
    d.warning = what == "SERVICE_RESTART_SUCCESS" and ev.warning or nil
  elseif what == "SERVICE_SKIPPED" then
    d.reason = ev.reason
  elseif what == "SNAPSHOT_KNOWN_GOOD" then
    -- a service's first run: the definition it ran before the run, made known good
    d.first_snapshot = d.first_snapshot or ev.snapshot
  end
end

-- summary.services: one entry per service the run decided about, in the plan's order:
-- { name, outcome = "succeeded" | "failed" | "rolled_back" | "rollback_failed" | "skipped",
--   method = "reload" | "restart" | nil (the flow never got that far), duration_ms = its flow's |
--   nil, error = why it failed or was skipped | nil }.
local function per_service(s)
  local seen = s.seen or { order = {}, by = {} }
  local outcome, names = {}, {}
  -- a later list is the more precise word: rolled_back and rollback_failed are failed too
  for _, pair in ipairs({ { s.succeeded, "succeeded" }, { s.failed, "failed" }, { s.rolled_back, "rolled_back" },
      { s.rollback_failed, "rollback_failed" }, { s.skipped, "skipped" } }) do
    for _, name in ipairs(pair[1] or {}) do
      if outcome[name] == nil then names[#names + 1] = name end
      outcome[name] = pair[2]
    end
  end
  local position = {}
  for i, name in ipairs(seen.order) do position[name] = position[name] or i end
  for i, name in ipairs(names) do position[name] = position[name] or (#seen.order + i) end
  table.sort(names, function(a, b) return position[a] < position[b] end)
  local list = {}
  for i, name in ipairs(names) do
    local d = seen.by[name] or {}
    local err = s.errors and s.errors[name]
    if err == nil and outcome[name] == "skipped" then err = d.reason end
    list[i] = { name = name, outcome = outcome[name], method = d.method, duration_ms = d.duration_ms,
      error = err ~= nil and tostring(err) or nil, warning = d.warning }
  end
  return list
end

local function summary_of(s)
  return {
    success = s.exit_code == 0,
    exit_code = s.exit_code,
    error = s.error,
    interrupted = s.interrupted or false,
    services = per_service(s),
    services_succeeded = s.succeeded or {},
    services_failed = s.failed or {},
    services_rolled_back = s.rolled_back or {},
    services_rollback_failed = s.rollback_failed or {},
    services_skipped = s.skipped or {},
    duration_ms = s.duration_ms or 0,
    run = s.run,
    events_file = s.events_file,
    message = s.message,
    services_recovered = s.recovered,
    services_unresolved = s.unresolved,
    hosts_lost = s.host_lost,
  }
end

local function usage_error(msg)
  return summary_of({ exit_code = rolling.EXIT_USAGE, error = msg })
end

-- rolling.prepare(opts) -> prep | nil, message: loads the platform and everything the run
-- needs before anything is touched (services file, order, deploy path, hook scripts); a problem
-- here is a configuration error (exit 2). opts as rolling.run's. The dry run calls it too, so
-- that both refuse exactly the same things with the same words.
-- prep = { platform, order, names, global_hooks, hooks = { [name] = set }, own_hooks = { [name] = set } }
local function prepare(opts)
  local platform, errs
  if opts.platform then
    platform = opts.platform
  elseif opts.services_table then
    platform, errs = services.validate(opts.services_table, opts.services_file or "services")
  else
    platform, errs = services.load(opts.services_file or "services.lua")
  end
  if not platform then
    return nil, table.concat(errs, "\n")
  end
  local names = opts.services
  if names and #names == 0 then names = nil end
  -- -H HOST: the services on that host (a platform without hosts: all of them, on HOST)
  if opts.host then
    local host, problem = services.parse_host(opts.host)
    if not host then return nil, ("option --host %s: %s"):format(("%q"):format(opts.host), problem) end
    local any = false
    for _, svc in ipairs(platform.services) do if svc.host then any = true break end end
    if not any then
      for _, svc in ipairs(platform.services) do svc.host = host end
    else
      local wanted, picked = nil, {}
      if names then wanted = {}; for _, n in ipairs(names) do wanted[n] = true end end
      for _, svc in ipairs(platform.services) do
        if svc.host == host and (not wanted or wanted[svc.name]) then picked[#picked + 1] = svc.name end
      end
      if #picked == 0 then
        return nil, ("no %sservice of %s is on host %s"):format(names and "selected " or "",
          tostring(platform.source or opts.services_file or "the services file"), host)
      end
      names = picked
    end
  end
  local order, err = dag.order(platform.services, names)
  if not order then
    return nil, err
  end
  if opts.deploy then
    if not opts.deploy_path then
      return nil, "--deploy needs --deploy-path DIR"
    end
    local st = fs.stat(opts.deploy_path, true)
    if not st then
      return nil, ("deploy path %s does not exist"):format(opts.deploy_path)
    elseif st.type ~= "dir" then
      return nil, ("deploy path %s is not a directory"):format(opts.deploy_path)
    end
    local without = {}
    for _, svc in ipairs(order) do
      if not svc.working_dir and not svc.blue_green then without[#without + 1] = svc.name end
    end
    if #without == #order then
      return nil, "--deploy: none of the selected services has a working_dir to deploy into"
    end
    -- one release directory goes into one service's code, or into the replicas of one group
    local group
    for _, svc in ipairs(order) do
      if #order > 1 and (not svc.group or (group and group ~= svc.group)) then
        return nil, "--deploy with several services: they must be the replicas of one group (one release for all)"
      end
      group = svc.group
    end
  end
  local global = hooks.set()
  for _, path in ipairs(opts.hook_files or {}) do
    local h, herr = hooks.load(path)
    if not h then return nil, herr end
    global:add(h)
  end
  local per_service, own = {}, {}
  for _, svc in ipairs(order) do
    if svc.hooks then
      local h, herr = hooks.load(svc.hooks)
      if not h then return nil, ("service %q: %s"):format(svc.name, herr) end
      local set = hooks.set({ table.unpack(global.list) })
      set:add(h)
      per_service[svc.name] = set
      own[svc.name] = hooks.set({ h })
    end
  end
  -- the balancers of the selected services' groups (opened: a bad script is a configuration
  -- error; HAProxy is reached only once the run has its lock)
  local balancers = {}
  for _, svc in ipairs(order) do
    local g = svc.group and platform.groups and platform.groups[svc.group]
    if g and g.balancer and not balancers[g.name or svc.group] then
      local b, berr = balancer.open(g, nil)
      if not b then return nil, ("group %q: %s"):format(svc.group, tostring(berr)) end
      if g.canary and g.canary.weight ~= nil and not b:can_weight() then
        return nil, ("group %q: canary.weight needs a balancer that sets weights: %s has no weight(member, w) function")
          :format(svc.group, b:describe())
      end
      balancers[svc.group] = b
    end
  end
  -- a blue-green service's balancer, where its traffic switches between the colours
  local bg_balancers = {}
  for _, svc in ipairs(order) do
    if svc.blue_green then
      local b, berr = balancer.open(svc.blue_green, nil)
      if not b then return nil, ("service %q: blue_green: %s"):format(svc.name, tostring(berr)) end
      bg_balancers[svc.name] = b
    end
  end
  return { platform = platform, order = order, names = names, global_hooks = global, hooks = per_service,
    own_hooks = own, balancers = balancers, bluegreen_balancers = bg_balancers }
end
rolling.prepare = prepare

-- Checks that every balancer the run needs answers, before anything is touched -> true |
-- nil, message.
local function reach_balancers(prep)
  for _, svc in ipairs(prep.order) do
    local b = svc.group and prep.balancers[svc.group]
    if b then
      local st, err = b:state({ name = svc.name, server = svc.balancer_server or svc.name })
      if not st then
        return nil, ("cannot reach the balancer of group %q (%s): %s"):format(svc.group, b:describe(), tostring(err))
      end
    end
    b = svc.blue_green and prep.bluegreen_balancers[svc.name]
    if b then
      for _, colour in ipairs(bluegreen.COLOURS) do
        local st, err = b:state({ name = svc.name, server = svc.blue_green[colour].balancer_server })
        if not st then
          return nil, ("cannot reach the balancer of blue-green service %q (%s): %s"):format(svc.name, b:describe(),
            tostring(err))
        end
      end
    end
  end
  return true
end

-- Why a service that never started was skipped. `blocked` is dag.blocked_by's map of the
-- failed services (computed once for all: a run may skip thousands).
local function skip_reason(svc, ctx, blocked)
  local failed = blocked[svc.name]
  if failed then
    return ("depends on %s, which failed"):format(failed)
  end
  if ctx.interrupted then
    return "interrupted before it started"
  end
  if ctx.aborted_by then
    return ("run stopped after %s failed (use --continue-on-error to go on)"):format(ctx.aborted_by)
  end
  return "depends on a service that did not succeed"
end

-- rolling.recover(ctx, prep, dead) -> summary fields, with .remaining (what --resume runs)
-- Resolves each service the interrupted run left in flight (rr.flow.recover): finished on the
-- new version, or rolled back to the old. A service whose migration or rsync of the dead run is
-- still running is left alone (and stays in the journal). Exit code: 0 every service finished,
-- 1 one was rolled back, 3 a rollback failed, 4 one is still blocked.
function rolling.recover(ctx, prep, dead, place)
  place = place or { state_root = ctx.state_root, fs = hostfs.here() }
  local j = journal.adopt(place.state_root, dead, place.fs)
  place.journal = j
  if not place.host then ctx.run_journal = j end
  local stream = ctx.events
  local names = journal.in_flight(dead)
  stream:emit("PLAN_START", { recover = dead.run, order = names, pid = fs.getpid() })
  local s = { succeeded = {}, failed = {}, rolled_back = {}, rollback_failed = {}, skipped = {}, recovered = {},
    errors = {} }
  local blocked = {}
  for _, name in ipairs(names) do
    local entry = dead.services[name]
    local svc = prep.platform.by_name[name]
    -- a migration on a host is a transient unit there: its manager says whether it still runs
    local live = journal.live_children(entry, { unit_alive = journal.unit_alive_on(place.manager or ctx.manager) })
    if #live > 0 then
      local what = {}
      for _, c in ipairs(live) do what[#what + 1] = journal.child_text(c) end
      local why = "still running from the interrupted run: " .. table.concat(what, ", ")
      stream:emit("RECOVERY_FAILED", { service = name, unit = svc and svc.unit, error = why, blocked = true })
      blocked[#blocked + 1] = name
      s.errors[name] = why
    elseif not svc then
      local why = ("not in %s any more: resolve it by hand, then --abandon"):format(tostring(ctx.services_file or "the services file"))
      stream:emit("RECOVERY_FAILED", { service = name, error = why })
      blocked[#blocked + 1] = name
      s.errors[name] = why
    else
      local outcome, err, info = (svc.blue_green and bluegreen.recover or flow.recover)(ctx, svc, entry)
      info = info or {}
      s.errors[name] = err
      if outcome == flow.SUCCESS then
        s.succeeded[#s.succeeded + 1] = name
        s.recovered[#s.recovered + 1] = name
        j:finished(name, true)
      elseif outcome == flow.ROLLBACK_FAILED then
        s.failed[#s.failed + 1] = name
        s.rollback_failed[#s.rollback_failed + 1] = name
      else
        s.failed[#s.failed + 1] = name
        s.recovered[#s.recovered + 1] = name
        if info.rolled_back then s.rolled_back[#s.rolled_back + 1] = name end
        j:finished(name, false)
      end
    end
  end
  -- the canary weights the dead run had set: back to the ones it recorded before setting them
  local weights_left = rolling.recover_weights(ctx, prep, j)
  for _, why in ipairs(weights_left) do blocked[#blocked + 1] = why end
  s.remaining = journal.remaining(j.data)
  local not_started = journal.not_started(j.data)
  if #s.rollback_failed > 0 then
    s.exit_code = rolling.EXIT_ROLLBACK_FAILED
  elseif #blocked > 0 then
    s.exit_code = rolling.EXIT_UNRESOLVED
  elseif #s.failed > 0 then
    s.exit_code = rolling.EXIT_FAILED
  else
    s.exit_code = rolling.EXIT_OK
  end
  local lines = {}
  for _, name in ipairs(names) do
    lines[#lines + 1] = ("  %s: %s"):format(name, s.errors[name] and tostring(s.errors[name])
      or "finished on the new version")
  end
  for _, why in ipairs(weights_left) do lines[#lines + 1] = "  " .. why end
  if #not_started > 0 then
    lines[#lines + 1] = "  not done by the interrupted run: " .. table.concat(not_started, ", ")
      .. " (--recover --resume runs them)"
  end
  s.message = "recovery of run " .. tostring(dead.run) .. ":\n" .. table.concat(lines, "\n")
  if s.exit_code ~= rolling.EXIT_OK then
    local first = s.failed[1] or blocked[1]
    s.error = first and (s.errors[first] and ("%s: %s"):format(first, tostring(s.errors[first])) or first) or nil
  end
  stream:emit("PLAN_END", { result = s.exit_code == 0 and "success" or "failed", recover = dead.run,
    exit_code = s.exit_code, succeeded = #s.succeeded, failed = #s.failed, rolled_back = #s.rolled_back,
    skipped = 0, duration_ms = 0 })
  if #blocked == 0 and #s.rollback_failed == 0 then
    -- resolved: the journal goes (--resume writes its own from here)
    if not ctx.resume then j:close() end
  end
  return s
end

-- rolling.recover_weights(ctx, prep, j) -> { why, ... }: gives each canary whose weight an
-- interrupted run had set (j.data.weights) the weight it recorded before, at its group's balancer,
-- with a BALANCER_WEIGHT event; what cannot be given back is returned (and stays in the journal).
function rolling.recover_weights(ctx, prep, j)
  local left, names = {}, {}
  for n in pairs(j.data.weights or {}) do names[#names + 1] = n end
  table.sort(names)
  for _, n in ipairs(names) do
    local w = j.data.weights[n]
    local g = prep.platform.groups and prep.platform.groups[w.group]
    local b, err = ctx.balancers and ctx.balancers[w.group], nil
    if not b and g and g.balancer then b, err = balancer.open(g, nil) end
    local weight = math.tointeger(w.weight) or w.weight
    local ok
    if b then ok, err = b:set_weight({ name = n, server = w.server }, weight) end
    if ok then
      ctx.events:emit("BALANCER_WEIGHT", { service = n, server = w.server, balancer = b:describe(), weight = weight,
        reason = "recovery: the weight it had before the interrupted run" })
      j:weight_restored(n)
    else
      local why = ("%s: cannot give server %s its weight %s back at %s: %s"):format(n, tostring(w.server),
        tostring(weight), tostring(w.balancer), b and tostring(err) or ("group %s has no balancer in %s"):format(
        tostring(w.group), tostring(ctx.services_file or "the services file")))
      ctx.events:emit("WARNING", { service = n, warning = why })
      left[#left + 1] = why
    end
  end
  return left
end

-- rolling.run(opts) -> summary (see summary_of). opts:
--   services_file | services_table | platform, services = {names} (nil: all),
--   force, deploy, deploy_path, skip_migrations, user, events_file (false: none),
--   parallel, continue_on_error, hook_files, accept_unknown_definition, journal,
--   ui (rr.ui or nil), state_root, manager (an rr.systemd manager to reuse)
function rolling.run(opts)
  local t0 = rr.now()
  if opts.promote then
    -- the held groups' members and the release their canaries were held with
    local names = {}
    for _, rec in pairs(canary.all_held(opts.state_root or rolling.state_root(opts.user))) do
      if rec.release and not opts.deploy_path then opts.deploy, opts.deploy_path = true, rec.release end
      for _, n in ipairs(rec.members or {}) do names[#names + 1] = n end
    end
    if (not opts.services or #opts.services == 0) and #names > 0 then opts.services = names end
  end
  local prep, err = prepare(opts)
  if not prep then
    return usage_error(err)
  end
  local view = opts.ui
  -- --parallel 0: no limit (group budgets still apply)
  local parallel = math.floor(opts.parallel or 1)
  if parallel <= 0 then parallel = math.huge end
  local state_root = opts.state_root or rolling.state_root(opts.user)

  -- The hosts the selected services live on: this machine (false) and each remote host. Each
  -- gets a place (rr.places, rr.flow.place): its manager, its files (rr.hostfs), its state root,
  -- its lock and its run journal. Remote hosts are opened at once, one task each.
  local hosts = hostplaces.hosts(prep.order)
  local set, perr = hostplaces.open({ hosts = hosts, user = opts.user, manager = opts.manager, state_root = state_root,
    host_state_root = opts.host_state_root, ssh_config = opts.ssh_config })
  if not set then
    return summary_of({ exit_code = rolling.EXIT_FAILED, error = perr })
  end
  -- managers and locks opened here are released on every way out
  local close_places <close> = set
  local places = set.by
  local place_list = set.list
  local remote_hosts = {}
  for _, host in ipairs(hosts) do if host then remote_hosts[#remote_hosts + 1] = host end end
  local manager = places[false] and places[false].manager or opts.manager

  -- An earlier run that died mid-way (its lock died with it, so a journal here is a dead run's),
  -- on any of the hosts: nothing is touched until it is resolved.
  local deads = set:interrupted()
  local dead = deads[1] and deads[1].data
  if dead and not (opts.recover or opts.abandon) then
    local lines = {}
    for _, d in ipairs(deads) do
      if d.place.host then lines[#lines + 1] = ("on host %s (%s):"):format(d.place.host, d.place.state_root) end
      for _, l in ipairs(journal.describe(d.data, { unit_alive = journal.unit_alive_on(d.place.manager) })) do
        lines[#lines + 1] = l
      end
    end
    return summary_of({ exit_code = rolling.EXIT_UNRESOLVED, error = table.concat(lines, "\n") })
  end
  if not dead and (opts.recover or opts.abandon) then
    return summary_of({ exit_code = rolling.EXIT_OK,
      message = ("no interrupted run on %s: nothing to %s"):format(#remote_hosts > 0 and "these hosts" or "this manager",
        opts.abandon and "abandon" or "recover") })
  end
  for _, d in ipairs(deads) do
    if d.data.unreadable and opts.recover then
      return summary_of({ exit_code = rolling.EXIT_UNRESOLVED, error = d.data.unreadable
        .. ": recovery needs it; check the services by hand, then --abandon" })
    end
  end

  -- a blue-green service deploys into its idle colour: which colour is live must be clear
  -- before anything is touched (recovery takes the colours from the journal)
  if not (opts.recover or opts.abandon) then
    for _, svc in ipairs(prep.order) do
      if svc.blue_green then
        local pl = places[svc.host or false]
        local live, why = bluegreen.live(pl.manager, pl.state_root, svc, opts.user, pl.fs)
        if not live then return usage_error(why) end
      end
    end
  end

  if not opts.abandon then
    local bok, berr = reach_balancers(prep)
    if not bok then return summary_of({ exit_code = rolling.EXIT_FAILED, error = berr }) end
  end

  local events_file = opts.events_file
  if events_file == nil then events_file = rolling.default_events_file(opts.user) end
  local seen = { order = {}, by = {} } -- the summary's per-service detail (note)
  local stream, eerr = events.open({
    path = events_file or nil, journal = opts.journal, hooks = prep.global_hooks,
    service_hooks = function(name) return prep.own_hooks[name] end,
    view = function(ev) note(seen, ev); if view then view:event(ev) end end,
  })
  if not stream then
    return summary_of({ exit_code = rolling.EXIT_FAILED, error = eerr })
  end

  -- the log is closed on every way out (close is idempotent)
  local close_log <close> = setmetatable({}, { __close = function() stream:close() end })

  local ctx = {
    manager = manager, events = stream, state_root = state_root, user = opts.user, balancers = prep.balancers,
    bluegreen_balancers = prep.bluegreen_balancers,
    hosts = places,
    services_file = opts.services_file, resume = opts.resume,
    platform = prep.platform,
    opts = { force = opts.force, deploy = opts.deploy, deploy_path = opts.deploy_path,
      skip_migrations = opts.skip_migrations, accept_unknown_definition = opts.accept_unknown_definition },
    hooks_for = function(svc) return prep.hooks[svc.name] or prep.global_hooks end,
    on_step = view and function(svc, step) view:step(svc, step) end,
  }

  if opts.abandon then
    local left = ""
    for _, d in ipairs(deads) do
      local ok, rerr = journal.remove(d.place.state_root, d.place.fs)
      if not ok then return summary_of({ exit_code = rolling.EXIT_FAILED, error = rerr }) end
      -- what --abandon leaves as it is: a canary weight the run set and never gave back
      for _, line in ipairs(journal.describe_weights(d.data)) do left = left .. "\nleft as it is: " .. line end
    end
    stream:emit("RUN_ABANDONED", { abandoned_run = dead.run, abandoned_pid = dead.pid,
      in_flight = journal.in_flight(dead), pid = fs.getpid(), user = os.getenv("USER") or os.getenv("LOGNAME"),
      uid = fs.getuid and fs.getuid() or nil })
    return summary_of({ exit_code = rolling.EXIT_OK, run = stream.run, events_file = events_file or nil,
      message = ("forgot the interrupted run %s (in flight: %s)%s"):format(tostring(dead.run),
        #journal.in_flight(dead) > 0 and table.concat(journal.in_flight(dead), ", ") or "none", left) })
  end

  local recovery
  if opts.recover then
    for _, d in ipairs(deads) do
      local r = rolling.recover(ctx, prep, d.data, d.place)
      if not recovery then
        recovery = r
      else
        for _, key in ipairs({ "succeeded", "failed", "rolled_back", "rollback_failed", "recovered", "remaining" }) do
          for _, n in ipairs(r[key] or {}) do table.insert(recovery[key], n) end
        end
        for n, e in pairs(r.errors or {}) do recovery.errors[n] = e end
        local rank = { [rolling.EXIT_OK] = 0, [rolling.EXIT_FAILED] = 1, [rolling.EXIT_UNRESOLVED] = 2,
          [rolling.EXIT_ROLLBACK_FAILED] = 3 }
        if (rank[r.exit_code] or 0) > (rank[recovery.exit_code] or 0) then recovery.exit_code = r.exit_code end
        recovery.message = recovery.message .. "\n" .. r.message
        recovery.error = recovery.error or r.error
      end
    end
    if not opts.resume or recovery.exit_code ~= rolling.EXIT_OK and recovery.exit_code ~= rolling.EXIT_FAILED
        or #recovery.remaining == 0 then
      recovery.run, recovery.events_file, recovery.seen = stream.run, events_file or nil, seen
      recovery.duration_ms = math.floor((rr.now() - t0) * 1000 + 0.5)
      return summary_of(recovery)
    end
    -- --resume: the interrupted run's plan goes on with what it had not done
    local order, oerr = dag.order(prep.platform.services, recovery.remaining)
    if not order then return usage_error(oerr) end
    prep.order, prep.names = order, recovery.remaining
  end

  -- Which definitions systemd has not loaded yet, seen before any flow's daemon-reload hides
  -- it: a later service's unknown edit must not become its known-good definition.
  ctx.initially_stale = {}
  -- read at once for all services (a few at a time): one after another, it was most of the
  -- start-up of a large platform
  local scan = {}
  for i = 1, math.min(32, #prep.order) do
    scan[i] = rr.spawn(function()
      for k = i, #prep.order, 32 do
        local svc = prep.order[k]
        local place = flow.place(ctx, svc)
        local unit = place.manager and place.manager:unit(svc.unit)
        local need = unit and unit:get("NeedDaemonReload")
        local fragment = unit and unit:get("FragmentPath")
        local dropins = unit and unit:get("DropInPaths")
        if need or (fragment and #flow.unlisted_dropins(svc, { FragmentPath = fragment, DropInPaths = dropins },
            opts.user, place.fs) > 0) then
          ctx.initially_stale[svc.name] = true
        end
      end
    end)
  end
  if #scan > 0 then rr.wait(scan) end

  local order_names = {}
  for i, svc in ipairs(prep.order) do order_names[i] = svc.name end
  stream:emit("PLAN_START", { order = order_names, parallel = parallel == math.huge and 0 or parallel, force = opts.force or nil,
    deploy = opts.deploy and opts.deploy_path or nil, user = opts.user or nil, pid = fs.getpid and fs.getpid() or nil })

  -- before_plan may stop the whole run before anything is touched (a change freeze).
  local go, why = prep.global_hooks:call("before_plan", { order = order_names, run = stream.run })
  if go ~= true then
    local reason = go == false and ("vetoed by before_plan: " .. why) or why
    stream:emit("PLAN_END", { result = "failed", exit_code = rolling.EXIT_FAILED, error = reason,
      succeeded = 0, failed = 0, rolled_back = 0, skipped = #order_names, duration_ms = 0 })
    return summary_of({ exit_code = rolling.EXIT_FAILED, error = reason, skipped = order_names, run = stream.run,
      events_file = events_file or nil })
  end

  -- The run journal: what a later run needs to know if this one dies. One per host, in that
  -- host's state root, naming only that host's services (its --resume runs those).
  for _, p in ipairs(place_list) do
    local names = {}
    for _, n in ipairs(order_names) do
      if (prep.platform.by_name[n].host or false) == (p.host or false) then names[#names + 1] = n end
    end
    if p.journal then
      p.journal:renew(stream.run, names)
    else
      local pj, jerr = journal.create(p.state_root, { run = stream.run, argv = opts.argv,
        services_file = opts.services_file, user = opts.user, order = names, fs = p.fs, host = p.host })
      if not pj then
        for _, q in ipairs(place_list) do if q.journal then q.journal:close() end end
        stream:emit("PLAN_END", { result = "failed", exit_code = rolling.EXIT_FAILED, error = jerr,
          succeeded = 0, failed = 0, rolled_back = 0, skipped = #order_names, duration_ms = 0 })
        return summary_of({ exit_code = rolling.EXIT_FAILED, error = jerr, skipped = order_names, run = stream.run,
          events_file = events_file or nil })
      end
      p.journal = pj
    end
  end
  if places[false] then ctx.run_journal = places[false].journal end
  local function journal_of(name)
    return places[prep.platform.by_name[name].host or false].journal
  end

  local inflight = {}
  local on_signal = function(name)
    if not ctx.interrupted then
      ctx.interrupted = name
      local names = {}
      for _, e in ipairs(inflight) do names[#names + 1] = e.svc.name end
      stream:emit("INTERRUPTED", { signal = name,
        note = #names > 0 and ("finishing %s (or rolling it back)"):format(table.concat(names, ", "))
          or "nothing in flight" })
    end
  end
  rr.on_signal(on_signal)
  if view and view.begin then
    local groups
    for name, g in pairs(prep.platform.groups or {}) do
      groups = groups or {}
      groups[name] = { members = #g.members, budget = g.max_unavailable_count }
    end
    local host_of = {}
    for _, n in ipairs(order_names) do host_of[n] = prep.platform.by_name[n].host end
    view:begin({ order = order_names, parallel = parallel, groups = groups, hosts = host_of,
      history = require("rr.ui").history(events_file or nil) })
  end
  local stop_ticker = view and view:start_ticker() or function() end

  local sched = assert(dag.scheduler(prep.platform.services, prep.names))
  local chain = assert(dag.chain_lengths(prep.platform.services, prep.names))
  local position = {}
  for i, svc in ipairs(prep.order) do position[svc.name] = i end
  local done, taken, launched = {}, {}, {}
  local pool = {} -- ready and not launched, the best candidate last
  local waiting = {} -- [name] = why a ready service waits (a group's budget)
  local lost_skip = {} -- [name] = why a ready service never started (its host was lost)
  local s = { succeeded = {}, failed = {}, rolled_back = {}, rollback_failed = {}, skipped = {}, run = stream.run,
    events_file = events_file or nil, seen = seen }
  -- the longest remaining dependency chain first, then declaration order
  local function better(a, b)
    if chain[a.name] ~= chain[b.name] then return chain[a.name] > chain[b.name] end
    return position[a.name] < position[b.name]
  end
  local function pool_add(svc)
    local lo, hi = 1, #pool + 1
    while lo < hi do
      local mid = (lo + hi) // 2
      if better(svc, pool[mid]) then lo = mid + 1 else hi = mid end
    end
    table.insert(pool, lo, svc)
  end
  -- A group's members down right now: those in flight, and those not healthy (one look each).
  -- Canaries: per group with a canary among the selected members, which go first, and where
  -- the group stands ("rolling", "soaking", "passed", "failed", "held").
  local selected_set = {}
  for _, svc in ipairs(prep.order) do selected_set[svc.name] = true end
  local canaries, canary_of, canary_state, canary_info = {}, {}, {}, {}
  for name, g in pairs(prep.platform.groups or {}) do
    if g.canary then
      local held = canary.held(state_root, name)
      if opts.promote and held then
        -- promoted: the canaries are on the new release already; the rest go now
        canary_state[name] = "passed"
        for _, n in ipairs(held.canaries or {}) do
          if selected_set[n] then taken[n] = true; done[n] = true; launched[n] = true; canary_of[n] = name end
        end
        canary_info[name] = { promoted = held }
      elseif not opts.promote then
        local list = canary.members(g, selected_set)
        if #list > 0 and #list < #g.members then
          canaries[name] = list
          canary_state[name] = "rolling"
          canary_info[name] = { succeeded = 0, records = {}, known_good = {} }
          for _, n in ipairs(list) do
            canary_of[n] = name
            -- the definition known good before the canary's flow makes its own so: what a later
            -- plans/rollback.lua --group of a held canary restores
            local np = flow.place(ctx, prep.platform.by_name[n])
            local kg = np.state_root and require("rr.snapshot").on(np.fs).known_good(np.state_root, n)
            if kg and kg.dir then canary_info[name].known_good[n] = kg.dir:match("[^/]+$") end
          end
          if g.canary.weight ~= nil and prep.balancers[name] then
            -- the canaries serve at this weight from their enable (rr.flow) until their soak ends;
            -- the weight each has now goes into the run journal first (durably), so that an engine
            -- killed meanwhile leaves --recover what to give back
            ctx.canary_weights = ctx.canary_weights or {}
            local b = prep.balancers[name]
            for _, n in ipairs(list) do
              ctx.canary_weights[n] = g.canary.weight
              local server = prep.platform.by_name[n].balancer_server or n
              local st = b:state({ name = n, server = server })
              local w = st and (st.user_weight or st.weight)
              if w ~= nil then journal_of(n):weight(n, { group = name, server = server, balancer = b:describe(), weight = w }) end
            end
          end
        end
      end
    end
  end
  local soaks = {}
  local function group_room(svc)
    local g = svc.group and prep.platform.groups and prep.platform.groups[svc.group]
    if not g then return true end
    local cs = canary_state[svc.group]
    if cs == "failed" and canary_of[svc.name] then
      return nil, ("the canary of group %s failed"):format(svc.group)
    end
    if cs and cs ~= "passed" and not canary_of[svc.name] then
      if cs == "failed" or cs == "held" then
        return nil, ("the canary of group %s %s"):format(svc.group, cs == "held" and "is held (--canary-only)"
          or "failed")
      end
      return nil, ("waits for the canary of group %s"):format(svc.group)
    end
    local budget = g.max_unavailable_count or 1
    local down, names = 0, {}
    for _, e in ipairs(inflight) do
      if e.svc.group == svc.group then down = down + 1; names[#names + 1] = e.svc.name .. " (in flight)" end
    end
    if down >= budget then
      return nil, ("group %s: %d/%d down, the budget is %d: %s"):format(svc.group, down, #g.members, budget,
        table.concat(names, ", "))
    end
    for _, name in ipairs(g.members) do
      local m = prep.platform.by_name[name]
      local busy = false
      for _, e in ipairs(inflight) do if e.svc.name == name then busy = true break end end
      if name ~= svc.name and not busy then
        local mp = flow.place(ctx, m)
        local unit = mp.manager and mp.manager:unit(m.unit)
        local kind = unit and health.snapshot(unit, m.health) or "unhealthy"
        if kind ~= "healthy" then
          down = down + 1
          names[#names + 1] = name .. " (" .. kind .. ")"
          if down >= budget then
            return nil, ("group %s: %d/%d down, the budget is %d: %s"):format(svc.group, down, #g.members, budget,
              table.concat(names, ", "))
          end
        end
      end
    end
    return true
  end
  local function launch_ready()
    for _, svc in ipairs(sched:ready(done, taken)) do
      taken[svc.name] = true
      pool_add(svc)
    end
    local i = #pool
    while i >= 1 and #inflight < parallel do
      local svc = pool[i]
      local lost_place = svc.host and places[svc.host] and places[svc.host].lost
      local room, why
      if not lost_place then room, why = group_room(svc) end
      if ctx.interrupted or ctx.aborted_by then return end
      if lost_place then
        -- nothing new starts on a host that was lost
        table.remove(pool, i)
        lost_skip[svc.name] = ("host %s was lost: %s"):format(svc.host, lost_place)
      elseif room then
        table.remove(pool, i)
        waiting[svc.name] = nil
        launched[svc.name] = true
        inflight[#inflight + 1] = { svc = svc, task = rr.spawn(svc.blue_green and bluegreen.run or flow.run, ctx, svc) }
      else
        if waiting[svc.name] ~= why then
          waiting[svc.name] = why
          stream:emit("SERVICE_WAITING", { service = svc.name, unit = svc.unit, reason = why })
        end
      end
      i = i - 1
      if i > #pool then i = #pool end
    end
  end

  -- A canary's balancer weight back to the one it had before the run set its canary weight
  -- (nothing to do when it was never set).
  local function restore_weight(group, n, why)
    if ctx.canary_weights then ctx.canary_weights[n] = nil end
    local b = prep.balancers[group]
    if not b or prep.platform.groups[group].canary.weight == nil then return end
    local svc = prep.platform.by_name[n]
    local member = { name = n, server = svc.balancer_server or n }
    local ok, w = b:restore_weight(member)
    if ok then journal_of(n):weight_restored(n) end
    if not ok then
      stream:emit("WARNING", { service = n, unit = svc.unit, warning = ("cannot give %s its weight back at %s: %s")
        :format(member.server, b:describe(), tostring(w)) })
    elseif w ~= nil then
      stream:emit("BALANCER_WEIGHT", { service = n, unit = svc.unit, server = member.server, balancer = b:describe(),
        weight = w, reason = why })
    end
  end

  -- A canary on the new release back on the old one, when its group's canary failed: code and
  -- the definition known good before the run; back in rotation (once healthy) at the weight it had.
  local function roll_back_canary(group, n, why)
    local info = canary_info[group]
    local svc = prep.platform.by_name[n]
    if ctx.canary_weights then ctx.canary_weights[n] = nil end
    local rok = canary.roll_back(ctx, svc, { reason = "the canary of group " .. group .. " failed: " .. tostring(why),
      record = info.records[n], before = info.known_good[n], group = group })
    for i, x in ipairs(s.succeeded) do if x == n then table.remove(s.succeeded, i) break end end
    s.failed[#s.failed + 1] = n
    s.errors = s.errors or {}
    s.errors[n] = "canary failed: " .. tostring(why)
    restore_weight(group, n, "the canary was rolled back")
    journal_of(n):finished(n, false)
    if rok then
      s.rolled_back[#s.rolled_back + 1] = n
      if info.records[n] then
        local np = flow.place(ctx, svc)
        state.deploy_undone(np.state_root, n, info.records[n].state_dir, np.fs)
      end
    else
      s.rollback_failed[#s.rollback_failed + 1] = n
      ctx.aborted_by = ctx.aborted_by or n
    end
  end

  -- A canary that soaked: passed (the rest may go, or the group is held), or failed (every
  -- canary rolled back, the rest never touched).
  local function soak_ended(group, ok, why)
    local info = canary_info[group]
    if ok then
      stream:emit("CANARY_PASSED", { group = group, canaries = canaries[group],
        duration_ms = math.floor((rr.now() - info.soak_t0) * 1000 + 0.5) })
      -- its share of the traffic back before the rest rolls
      for _, n in ipairs(canaries[group]) do restore_weight(group, n, "the canary passed") end
      if opts.canary_only then
        canary_state[group] = "held"
        local deploys = {}
        for _, n in ipairs(canaries[group]) do deploys[n] = info.records[n] and info.records[n].state_dir or nil end
        local hok, herr = canary.hold(state_root, group, { run = stream.run, release = opts.deploy_path,
          canaries = canaries[group], members = prep.platform.groups[group].members,
          passed_at = require("rr.log").timestamp(), deploys = deploys, known_good = info.known_good })
        if not hok then
          stream:emit("WARNING", { warning = ("cannot record the held canary of %s: %s"):format(group, tostring(herr)) })
        end
      else
        canary_state[group] = "passed"
      end
      return
    end
    canary_state[group] = "failed"
    stream:emit("CANARY_FAILED", { group = group, canaries = canaries[group], error = why })
    s.canary_failed = s.canary_failed or {}
    s.canary_failed[group] = why
    -- the canaries go back to the old release: code and definition; back in rotation (once
    -- healthy) at the weight they had
    if ctx.canary_weights then
      for _, n in ipairs(canaries[group]) do ctx.canary_weights[n] = nil end
    end
    for _, n in ipairs(canaries[group]) do roll_back_canary(group, n, why) end
    if not opts.continue_on_error then ctx.aborted_by = ctx.aborted_by or ("the canary of group " .. group) end
  end

  while true do
    if not ctx.interrupted and not ctx.aborted_by then
      launch_ready()
    end
    if #inflight == 0 and #soaks == 0 then break end
    local tasks = {}
    for i, e in ipairs(inflight) do tasks[i] = e.task end
    for _, sk in ipairs(soaks) do tasks[#tasks + 1] = sk.task end
    local task, tok, outcome, ferr, info = rr.wait_any(tasks)
    local soaked
    for i, sk in ipairs(soaks) do
      if sk.task == task then soaked = table.remove(soaks, i) break end
    end
    if soaked then
      if not tok then outcome, ferr = nil, "the soak failed: " .. tostring(outcome) end
      soak_ended(soaked.group, outcome == true, ferr)
      goto continue
    end
    local entry
    for i, e in ipairs(inflight) do
      if e.task == task then entry = table.remove(inflight, i) break end
    end
    local name = entry.svc.name
    if not tok then
      -- flow.run catches its own errors; this is a bug in the runner's reach, still contained.
      outcome, ferr = flow.FAILED, "internal error: " .. tostring(outcome)
    end
    journal_of(name):finished(name, outcome == flow.SUCCESS)
    if outcome == flow.SUCCESS then
      done[name] = true
      s.succeeded[#s.succeeded + 1] = name
      local group = canary_of[name]
      local ci = group and canaries[group] and canary_info[group]
      if ci then
        ci.records[name] = info and info.deploy_record or nil
        if not ci.known_good[name] then ci.known_good[name] = canary.snapshot_name(seen.by[name] and seen.by[name].first_snapshot) end
        ci.passed = ci.passed or {}
        ci.passed[#ci.passed + 1] = name
      end
      if ci and canary_state[group] == "failed" then
        -- another canary of its group failed its own flow while this one was in flight
        roll_back_canary(group, name, ci.failed_why)
      elseif group and canary_state[group] == "rolling" then
        ci.succeeded = ci.succeeded + 1
        if ci.succeeded == #canaries[group] then
          -- every canary is on the new release: watch them serve
          local g = prep.platform.groups[group]
          local analysis, aerr
          if g.canary.analysis then analysis, aerr = canary.load_analysis(g.canary.analysis) end
          local cs, others = {}, {}
          for _, n in ipairs(canaries[group]) do cs[#cs + 1] = prep.platform.by_name[n] end
          for _, n in ipairs(g.members) do
            if not canary_of[n] then others[#others + 1] = prep.platform.by_name[n] end
          end
          canary_state[group] = "soaking"
          ci.soak_t0 = rr.now()
          stream:emit("CANARY_START", { group = group, canaries = canaries[group], soak = g.canary.soak })
          soaks[#soaks + 1] = { group = group, task = rr.spawn(function()
            if aerr then return nil, aerr end
            return canary.soak({ group = g, canaries = cs, others = others, ctx = ctx, analysis = analysis })
          end) }
        end
      end
    elseif outcome == flow.ROLLBACK_FAILED then
      s.failed[#s.failed + 1] = name
      s.rollback_failed[#s.rollback_failed + 1] = name
      ctx.aborted_by = ctx.aborted_by or name -- the platform needs a human now
    elseif outcome == flow.UNRESOLVED then
      -- its host was lost: the other hosts' independent work goes on
      s.failed[#s.failed + 1] = name
      s.unresolved = s.unresolved or {}
      s.unresolved[#s.unresolved + 1] = name
      local p = places[entry.svc.host]
      p.lost = p.lost or (info and info.host_lost) or "lost"
      p.left = p.left or {}
      p.left[#p.left + 1] = ("%s (phase %s)"):format(name, tostring(info and info.phase))
    else
      s.failed[#s.failed + 1] = name
      if info and info.rolled_back then s.rolled_back[#s.rolled_back + 1] = name end
      if not opts.continue_on_error then ctx.aborted_by = ctx.aborted_by or name end
    end
    s.errors = s.errors or {}
    if ferr ~= nil or outcome ~= flow.SUCCESS then s.errors[name] = ferr end
    if canary_of[name] and outcome ~= flow.SUCCESS and canary_state[canary_of[name]] == "rolling" then
      -- a canary that failed its own flow: the rest of its group is never touched, and the
      -- canaries already on the new release go back to the old one
      local group = canary_of[name]
      local ci = canary_info[group]
      canary_state[group] = "failed"
      ci.failed_why = ("%s: %s"):format(name, tostring(ferr))
      stream:emit("CANARY_FAILED", { group = group, canaries = canaries[group], error = ci.failed_why })
      s.canary_failed = s.canary_failed or {}
      s.canary_failed[group] = ci.failed_why
      for _, n in ipairs(ci.passed or {}) do roll_back_canary(group, n, ci.failed_why) end
    end
    ::continue::
  end
  stop_ticker()
  -- a canary whose group failed otherwise (its own flow, or another canary's) has its weight back too
  for group, list in pairs(canaries) do
    for _, n in ipairs(list) do restore_weight(group, n, ("the canary of group %s %s"):format(group,
      canary_state[group] == "failed" and "failed" or "ended")) end
  end

  local never = { table.unpack(s.failed) }
  for n in pairs(lost_skip) do never[#never + 1] = n end
  local blocked = assert(dag.blocked_by(prep.platform.services, never))
  for _, svc in ipairs(prep.order) do
    if not launched[svc.name] then
      local cs = svc.group and canary_state[svc.group]
      local reason
      if cs == "held" then
        reason = "--canary-only: promote with --promote"
      elseif cs == "failed" then
        reason = ("the canary of group %s failed: %s"):format(svc.group,
          tostring(s.canary_failed and s.canary_failed[svc.group] or "see its canaries"))
      elseif lost_skip[svc.name] then
        reason = lost_skip[svc.name]
      elseif svc.host and places[svc.host] and places[svc.host].lost then
        reason = ("host %s was lost: %s"):format(svc.host, places[svc.host].lost)
      elseif waiting[svc.name] and not ctx.interrupted and not ctx.aborted_by then
        reason = "never had room in its group's budget (" .. waiting[svc.name] .. ")"
      else
        reason = skip_reason(svc, ctx, blocked)
      end
      s.skipped[#s.skipped + 1] = svc.name
      if cs == "held" then s.held = (s.held or 0) + 1 end
      stream:emit("SERVICE_SKIPPED", { service = svc.name, unit = svc.unit, reason = reason })
    end
  end

  -- An interrupt that came after the last service had started stopped nothing: the run is
  -- what it is (a CI script must not read a complete, healthy run as a failure).
  s.interrupted = ctx.interrupted ~= nil and #s.skipped > 0
  -- What a lost host was left with, and how to resume once it is back.
  local lost_lines = {}
  for _, p in ipairs(place_list) do
    if p.lost then
      local left = {}
      for _, svc in ipairs(prep.order) do
        if svc.host == p.host and not launched[svc.name] then left[#left + 1] = svc.name end
      end
      lost_lines[#lost_lines + 1] = ("host %s was lost mid-run: %s"):format(p.host, p.lost)
      lost_lines[#lost_lines + 1] = "  in flight there, neither finished nor rolled back: "
        .. (p.left and table.concat(p.left, ", ") or "none")
      lost_lines[#lost_lines + 1] = "  not started there: " .. (#left > 0 and table.concat(left, ", ") or "none")
      lost_lines[#lost_lines + 1] = "  once it is back: " .. journal.resolve_command({
        services_file = opts.services_file, user = opts.user }, "--recover") .. " --resume"
        .. "   (its run journal on the host says what it left)"
      s.host_lost = s.host_lost or {}
      s.host_lost[#s.host_lost + 1] = p.host
    end
  end
  if #lost_lines > 0 then s.message = table.concat(lost_lines, "\n") end
  if #s.rollback_failed > 0 then
    s.exit_code = rolling.EXIT_ROLLBACK_FAILED
  elseif s.host_lost then
    -- its journal stays on the lost host: the next run there refuses until --recover
    s.exit_code = rolling.EXIT_UNRESOLVED
  elseif s.interrupted then
    s.exit_code = rolling.EXIT_INTERRUPTED
  elseif #s.failed > 0 or #s.skipped > (s.held or 0) then -- held on purpose (--canary-only) is no failure
    s.exit_code = rolling.EXIT_FAILED
  else
    s.exit_code = rolling.EXIT_OK
  end
  s.duration_ms = math.floor((rr.now() - t0) * 1000 + 0.5)
  if s.exit_code ~= 0 then
    local first = s.failed[1]
    s.error = first and ("%s: %s"):format(first, s.errors[first]) or (s.interrupted and "interrupted" or nil)
  end
  stream:emit("PLAN_END", {
    result = s.exit_code == 0 and "success" or (s.interrupted and "interrupted" or "failed"),
    exit_code = s.exit_code, interrupted = s.interrupted, duration_ms = s.duration_ms,
    succeeded = #s.succeeded, failed = #s.failed, rolled_back = #s.rolled_back, skipped = #s.skipped,
  })
  rr.off_signal(on_signal)
  for _, p in ipairs(place_list) do
    -- a host lost mid-run keeps its journal: the next run there says what it left
    if not p.lost then p.journal:close() end
  end
  for group, ci in pairs(canary_info) do
    if ci.promoted and s.exit_code == rolling.EXIT_OK then canary.release(state_root, group) end
  end
  if recovery then
    s.recovered = recovery.recovered
    for _, key in ipairs({ "succeeded", "failed", "rolled_back", "rollback_failed" }) do
      for i, n in ipairs(recovery[key]) do table.insert(s[key], i, n) end
    end
    s.errors = s.errors or {}
    for n, e in pairs(recovery.errors or {}) do
      if s.errors[n] == nil then s.errors[n] = e end
    end
  end
  local summary = summary_of(s)
  local hok, herr = prep.global_hooks:call("after_plan", summary)
  if hok == nil then
    stream:emit("HOOK_FAILED", { hook = "after_plan", error = herr })
  end
  return summary
end

return rolling
