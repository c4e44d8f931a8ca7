-- The dry run: the ordered plan with each service's steps and why, after read-only checks
-- (unit loaded, definition readable, paths exist, current health). It starts no job and
-- writes no file — not even the event log or the lock. A service on another host is read on
-- that host (p.places, rr.places opened without locks): its manager, its definition files, its
-- known-good snapshot, its deploy records and its run journal.
local fs = require("rr.fs")
local health = require("rr.health")
local flow = require("rr.flow")
local snapshot = require("rr.snapshot")

local dryrun = {}

local function list(t)
  return table.concat(t, ", ")
end

-- The place of a service for the dry run: p.places[host or false] when given, else this
-- machine's manager and files.
local function place_of(p, svc)
  local pl = p.places and p.places[svc.host or false]
  if pl then return pl end
  return { manager = p.manager, fs = fs, state_root = p.state_root }
end

-- dryrun.run{ order, manager, state_root, places, opts, out = fn(line) } -> problems (count), warnings
-- places: rr.places's set.by (every host of order, opened read-only); without it, this machine's
-- manager and state_root.
function dryrun.run(p)
  local out, opts = p.out, p.opts
  local problems, warnings = 0, 0
  local function problem(msg) problems = problems + 1; out("     ✘ " .. msg) end
  local function warn(msg) warnings = warnings + 1; out("     ! " .. msg) end
  local selected = {}
  for _, svc in ipairs(p.order) do selected[svc.unit] = true end

  -- a killed run first, on any host: the real run would refuse (exit 4) until it is resolved
  local journal = require("rr.journal")
  local looked = {}
  if p.places then
    for _, svc in ipairs(p.order) do
      local key = svc.host or false
      if looked[key] == nil then
        local pl = p.places[key]
        looked[key] = pl and pl.state_root and journal.look(pl.state_root, pl.fs) or false
        if looked[key] then looked[#looked + 1] = { host = svc.host, root = pl.state_root, look = looked[key] } end
      end
    end
  else
    local dead = p.state_root and journal.interrupted(p.state_root)
    if dead then looked[1] = { root = p.state_root, look = { data = dead, writer = "dead" } } end
  end
  for _, l in ipairs(looked) do
    local mark = ({ dead = "!! ", unknown = "?? ", alive = "== " })[l.look.writer]
    local pl = p.places and p.places[l.host or false]
    for _, line in ipairs(journal.look_lines(l.look, l.host, l.root,
        { unit_alive = journal.unit_alive_on(pl and pl.manager or p.manager) })) do
      out(mark .. line)
    end
    if l.look.writer == "dead" then
      out("!! the run below would refuse (exit 4) until that is resolved")
      problems = problems + 1
    elseif l.look.writer == "unknown" then
      out("?? if that run has ended, the run below would refuse (exit 4) until it is resolved")
    else
      out("== the run below would be refused while that run holds the lock")
    end
    out("")
  end
  out(("Dry run: %d service(s), in this order. Nothing will be changed.%s"):format(#p.order,
    opts.force and " (--force: no health checks, no stabilization)" or ""))
  for i, svc in ipairs(p.order) do
    out("")
    out(("%2d. %s (%s)%s"):format(i, svc.name, svc.unit,
      #svc.depends > 0 and ("  after " .. list(svc.depends)) or ""))
    if svc.blue_green then
      -- a blue-green release has steps of its own (rr.bluegreen)
      require("rr.bluegreen").explain(p, svc, out, problem, warn)
      goto next_service
    end
    local place = place_of(p, svc)
    local hfs = place.fs
    local unit, uerr, ucode = place.manager:unit(svc.unit)
    local props, err, code
    if unit then
      props, err, code = unit:properties()
    end
    if not unit then
      problem(("cannot load the unit: %s (%s)"):format(tostring(uerr), tostring(ucode)))
    elseif not props then
      problem(("cannot read the unit: %s (%s)"):format(tostring(err), tostring(code)))
    elseif props.LoadState ~= "loaded" then
      problem(("unit is %s"):format(props.LoadState))
    else
      -- current health: one look, no waiting
      local kind, detail = health.snapshot(unit, svc.health)
      out(("     now: %s, %s (%s)"):format(props.ActiveState, kind, detail))
      if kind ~= "healthy" and not opts.force then
        problem("the pre-restart health check would fail: the service would not be touched")
      end
      local readable = props.FragmentPath ~= "" and hfs.read(props.FragmentPath)
      if not readable then
        problem(("unit file %s is not readable"):format(props.FragmentPath))
      end

      local def = flow.definition_state({ state_root = place.state_root, user = opts.user, hosts = p.places }, svc,
        props)
      if def.known then
        out(("     rollback restores: the known-good definition of run %s (%s)"):format(
          tostring(def.known.run), tostring(def.known.created)))
      elseif def.unknown then
        warn("the definition changed on disk and there is no known-good snapshot: rollback could not restore the earlier "
          .. "definition (which files changed is unknown); the run refuses without --accept-unknown-definition")
      else
        out("     rollback restores: the definition on disk now (it becomes known good once the pre-check passes)")
      end
      for _, c in ipairs(def.changes) do
        out(("     definition %s: %s%s"):format(c.change, c.path,
          c.shared and (" (a %s drop-in: rollback leaves it as it is)"):format(c.scope or "shared") or ""))
        if opts.diff and c.change == "modified" then
          for line in (snapshot.on(hfs).unified_diff(def.known, c.path) or ""):gmatch("[^\n]+") do
            out("       " .. line)
          end
        end
      end

      if opts.deploy and svc.working_dir then
        out(("     deploy: rsync -a %s/ -> %s/%s (undone on rollback)"):format(opts.deploy_path, svc.working_dir,
          svc.deploy_delete and " with --delete" or ""))
        if not hfs.stat(svc.working_dir, true) then
          problem(("working_dir %s does not exist"):format(svc.working_dir))
        end
      end
      if svc.working_dir then dryrun.deploy_records(place, svc, out, warn) end
      if svc.migrate then
        if opts.skip_migrations then
          out("     migrate: skipped (--skip-migrations)")
        else
          out(("     migrate: %s (in %s; not undone on rollback%s)"):format(table.concat(svc.migrate, " "),
            svc.working_dir, svc.migrate_rollback and (", migrate_rollback: " .. table.concat(svc.migrate_rollback, " ")) or ""))
        end
      end
      local b = svc.group and p.balancers and p.balancers[svc.group]
      if b then
        local server = svc.balancer_server or svc.name
        local st, berr = b:state({ name = svc.name, server = server })
        if not st then
          problem(("cannot reach the balancer (%s): %s"):format(b:describe(), tostring(berr)))
        elseif st.admin == "maint" then
          problem(("%s is in maintenance at %s (set outside this run): the run would not touch it"):format(server,
            b:describe()))
        else
          local g = p.platform.groups[svc.group]
          out(("     drain: %s at %s (now %s, %s session(s)), wait up to %gs; back in rotation after the post-check")
            :format(server, b:describe(), tostring(st.admin), tostring(st.sessions), g.drain_timeout or 30))
        end
      end
      if def.stale then
        out(("     daemon-reload first (%s)"):format(props.NeedDaemonReload and "NeedDaemonReload=yes"
          or "a drop-in systemd has not loaded yet"))
      end
      local method, why = flow.choose_method(svc, props, def)
      out(("     %s: %s"):format(method, why))
      local implicit = {}
      -- units whose own dependency makes systemd restart them with this one
      local via = { RequiredBy = "Requires=", BoundBy = "BindsTo=", ConsistsOf = "PartOf=" }
      for _, field in ipairs({ "RequiredBy", "BoundBy", "ConsistsOf" }) do
        for _, u in ipairs(props[field] or {}) do
          if not selected[u] then implicit[#implicit + 1] = ("%s (%s)"):format(u, via[field]) end
        end
      end
      if #implicit > 0 then
        warn("systemd will also restart " .. list(implicit) .. ": they depend on this unit")
      end
      dryrun.check_ordering(p, svc, props, warn)
      if not opts.force then
        local hc = svc.health
        out(("     then: health check (%s, timeout %gs, retries %d), stabilize %gs"):format(
          hc.kind == "http" and hc.url or hc.kind, hc.timeout, hc.retries, svc.stabilize))
      end
    end
    ::next_service::
  end
  dryrun.schedule(p, out)
  out("")
  out(("Dry run done: %d problem(s), %d warning(s)."):format(problems, warnings))
  return problems, warnings
end

-- What the deploy pointers of svc say (on its host): an unfinished deploy (a run that did not
-- finish, or whose undo failed: the next deploy is refused until it is undone), and the last one,
-- which plans/rollback.lua undoes.
function dryrun.deploy_records(place, svc, out, warn)
  local state = require("rr.state")
  local where = svc.host and (" on " .. svc.host) or ""
  local inflight = state.read_pointer(place.state_root, svc.name, "inflight", place.fs)
  if inflight then
    warn(("an unfinished deploy%s: %s names %s (plans/rollback.lua --service %s undoes it; a new deploy is "
      .. "refused until then)"):format(where, state.pointer(place.state_root, svc.name, "inflight"), inflight, svc.name))
  end
  local last = state.read_pointer(place.state_root, svc.name, "last", place.fs)
  if last then
    out(("     last deploy%s: %s (plans/rollback.lua undoes it)"):format(where, last))
  end
end

-- services.lua's `depends` against the unit's own ordering: a declared dependency the unit
-- does not order itself After= (at boot, or on a manual start, systemd may start them in any
-- order), and a unit of the platform the unit orders itself after or requires that `depends`
-- does not list (rrengine may restart this service before that one).
function dryrun.check_ordering(p, svc, props, warn)
  if not p.platform then return end
  local after, pulls = {}, {}
  for _, u in ipairs(props.After or {}) do after[u] = true end
  for _, field in ipairs({ "Requires", "Wants", "BindsTo", "Requisite" }) do
    for _, u in ipairs(props[field] or {}) do pulls[u] = field end
  end
  local declared = {}
  for _, dep in ipairs(svc.depends or {}) do
    local d = p.platform.by_name[dep]
    if d then
      declared[d.unit] = true
      if not after[d.unit] then
        warn(("depends on %s, but %s has no After=%s: outside rrengine, systemd may start them in any order")
          :format(dep, svc.unit, d.unit))
      end
    end
  end
  for _, other in ipairs(p.platform.services) do
    if other.unit ~= svc.unit and not declared[other.unit] and (after[other.unit] and pulls[other.unit]) then
      warn(("%s has %s= and After=%s, but services.lua does not list %s in its depends: rrengine may restart "
        .. "it first"):format(svc.unit, pulls[other.unit], other.unit, other.name))
    end
  end
end

-- The schedule: the waves of services that may run together (dependencies allowing), each
-- group's budget, and the longest dependency chain (what bounds the run with enough --parallel).
function dryrun.schedule(p, out)
  if not p.platform then return end
  local dag = require("rr.dag")
  local names = {}
  for i, svc in ipairs(p.order) do names[i] = svc.name end
  local waves = dag.layers(p.platform.services, names)
  local chain = dag.chain_lengths(p.platform.services, names)
  if not waves or not chain then return end
  local parallel = p.opts.parallel
  out("")
  out(("Schedule (--parallel %s): a service starts once its dependencies are done, the longest remaining "
    .. "chain first"):format(parallel == 0 and "0, no limit" or tostring(parallel or 1)))
  for i, wave in ipairs(waves) do
    local w = {}
    for _, svc in ipairs(wave) do w[#w + 1] = svc.name end
    out(("   %d. %s"):format(i, list(w)))
  end
  local canary = require("rr.canary")
  for name, g in pairs(p.platform.groups or {}) do
    out(("   group %s: %d member(s), at most %d down at once (max_unavailable %s)%s"):format(name, #g.members,
      g.max_unavailable_count or 1, tostring(g.max_unavailable or 1),
      g.balancer and (", drained at " .. (p.balancers and p.balancers[name] and p.balancers[name]:describe()
        or "its balancer")) or ""))
    if g.canary then
      local held = p.state_root and canary.held(p.state_root, name)
      if held then
        out(("     canary held: %s passed at %s (run %s), %d of %d members on the new release; "
          .. "promote: rrengine plans/rolling.lua --promote"):format(table.concat(held.canaries or {}, ", "),
          tostring(held.passed_at), tostring(held.run), #(held.canaries or {}), #g.members))
      else
        out(("     canary: %s first, soaked %gs%s, then the rest (a failed canary is rolled back, the rest untouched)")
          :format(table.concat(canary.members(g, nil), ", "), g.canary.soak or 0,
            g.canary.analysis and (" with the analysis " .. g.canary.analysis) or ""))
      end
    end
  end
  -- the critical path: from the service with the longest chain, always the dependent with the longest chain
  local by_name, start = {}, nil
  for _, svc in ipairs(p.order) do
    by_name[svc.name] = svc
    if not start or chain[svc.name] > chain[start] then start = svc.name end
  end
  local dependents = {}
  for _, svc in ipairs(p.order) do
    for _, d in ipairs(svc.depends or {}) do
      dependents[d] = dependents[d] or {}
      table.insert(dependents[d], svc.name)
    end
  end
  local path, at = {}, start
  while at do
    path[#path + 1] = at
    local next_name
    for _, d in ipairs(dependents[at] or {}) do
      if chain[d] and (not next_name or chain[d] > chain[next_name]) then next_name = d end
    end
    at = next_name
  end
  if #path > 0 then
    out(("   critical path (%d services one after another): %s"):format(#path, table.concat(path, " -> ")))
  end
end

return dryrun
