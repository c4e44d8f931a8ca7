-- rr.rollback: a service put back by hand — the known-good unit definition (unit file, its own
-- drop-ins, environment files) restored and a code deploy undone — then daemon-reload, start,
-- health check, through the same steps as an automatic rollback (rr.flow.rollback). The one
-- copy of what plans/rollback.lua and the REPL's rollback(name) do; they parse, print and exit.
--
-- Which deploy is undone (state_root/deploys/, see rr.deploy's pointers):
--   1. args.deploy_record, when given (plans/rollback.lua --deploy-record DIR: the command a
--      failed rollback prints);
--   2. else the <service>.inflight pointer's record: a deploy whose run did not finish (the
--      engine was killed, or its own undo failed) — the one to undo, whatever .last says;
--   3. else the <service>.last pointer's record: the last deploy whose run succeeded.
-- A record already undone is not undone again, and neither is an .inflight deploy that never
-- started changing files (no record, no backup: the engine was killed before); the code is
-- then left as it is — never the .last deploy undone instead. After a successful rollback the
-- pointer that named the record is removed. With no known-good snapshot and no deploy to undo
-- there is nothing to restore: the service is not touched.
local fs = require("rr.fs")
local events = require("rr.events")
local flow = require("rr.flow")
local deploy = require("rr.deploy")
local snapshot = require("rr.snapshot")
local state = require("rr.state")
local journal = require("rr.journal")
local ui = require("rr.ui")
local canary = require("rr.canary")
local balancer = require("rr.balancer")
local places = require("rr.places")

local rollback = {}

-- The caller's names for its options (args.spell), which the messages use: a library module
-- knows no command line of its own.
local SPELL_KEYS = {
  no_code = true,       -- what leaves the code as it is ("--no-code")
  deploy_record = true, -- how to name the record to undo ("--deploy-record DIR")
  named = true,         -- where a record named by the caller came from ("--deploy-record")
}

-- The deploy record to undo, from args.deploy_record or the pointers. Returns a table
-- { record =, dir =, source =, pointer_kind =, never_started = } (record nil: no code to undo)
-- | nil, message, code.
local function choose_record(svc, state_root, explicit, no_code, spell, hfs)
  local c = {}
  if explicit then
    c.dir, c.source = explicit, spell.named
  elseif not no_code then
    for _, kind in ipairs({ "inflight", "last" }) do
      local dir, _, code = state.read_pointer(state_root, svc.name, kind, hfs)
      local path = state.pointer(state_root, svc.name, kind)
      if dir then
        c.dir, c.source, c.pointer_kind = dir, path, kind
        break
      elseif code ~= "ENOENT" and hfs.stat(path) then
        return nil, ("cannot read the deploy pointer %s (remove it, or name the record with %s)")
          :format(path, spell.deploy_record), "EPOINTER"
      end
    end
  end
  -- A deploy the engine was killed before it changed anything: the pointer is written before
  -- apply, which writes its record before rsync runs. No record and no backup: nothing to undo.
  c.never_started = c.dir and c.pointer_kind == "inflight"
    and not hfs.exists(c.dir .. "/deploy.json") and not hfs.exists(c.dir .. "/backup") or false
  if c.dir and not c.never_started then
    local record, derr = deploy.on(hfs).load(c.dir)
    if not record then
      return nil, ("cannot read the deploy record %s (from %s): %s%s"):format(c.dir, c.source, tostring(derr),
        c.pointer_kind and ("; to roll back without it, remove that pointer or use " .. spell.no_code) or ""),
        "ERECORD"
    end
    if explicit and not state.same_path(record.target, svc.working_dir, hfs) then
      return nil, ("the deploy record %s is a deploy into %s, not into %s's working_dir %s"):format(
        c.dir, record.target, svc.name, svc.working_dir), "EFOREIGN"
    end
    c.record = record
  end
  return c
end

-- The pointers that name the chosen record: removed once it is undone.
local function pointers_naming(svc, state_root, c, hfs)
  local kinds = {}
  if c.never_started then
    kinds[1] = "inflight"
  elseif c.record then
    for _, kind in ipairs({ "inflight", "last" }) do
      local dir = state.read_pointer(state_root, svc.name, kind, hfs)
      if kind == c.pointer_kind or state.same_path(dir, c.dir, hfs) then
        kinds[#kinds + 1] = kind
      end
    end
  end
  return kinds
end

-- Says which deploy is undone and why (or why the code is left). Returns the record to undo, or nil.
local function announce(svc, state_root, c, no_code, spell, say, hfs)
  local record = c.record
  if record then
    local when = ("created %s%s"):format(tostring(record.created_at),
      record.applied_at and (", applied " .. record.applied_at) or "")
    local why = c.pointer_kind == "inflight" and " — a deploy whose run did not finish"
      or c.pointer_kind == "last" and " — the last successful deploy" or ""
    if record.state == "undone" then
      say(("deploy record %s (from %s): already undone%s; the code is left as it is"):format(
        c.dir, c.source, record.undone_at and (" at " .. record.undone_at) or ""))
      return nil
    end
    say(("deploy record %s (from %s%s): state %s, %s; undoing it in %s"):format(
      c.dir, c.source, why, tostring(record.state), when, record.target))
    if record.state == "applying" then
      say("note: that deploy was interrupted during rsync; if its rsync still runs (pgrep -a rsync), "
        .. "stop it first")
    end
    if c.pointer_kind == "last" then
      -- A later deploy of this service that was undone already (its run rolled back): the
      -- code now is the .last one, and undoing it goes one release further back.
      local runs = state.runs_dir(state_root)
      for _, run in ipairs(hfs.list(runs) or {}) do
        local dir = runs .. "/" .. run .. "/" .. svc.name
        local later = hfs.stat(dir .. "/deploy.json") and deploy.on(hfs).load(dir)
        if later and later.state == "undone" and tostring(later.created_at) > tostring(record.created_at)
            and not state.same_path(dir, c.dir, hfs) then
          say(("note: a later deploy (%s, created %s) was already undone; this undoes the release "
            .. "before it too (%s leaves the code as it is)"):format(dir, tostring(later.created_at), spell.no_code))
          break
        end
      end
    end
    return record
  elseif c.never_started then
    say(("deploy pointer %s names %s, which holds no deploy record: that deploy never started "
      .. "changing files; the code is left as it is"):format(c.source, c.dir))
  elseif no_code then
    say(spell.no_code .. ": the code is left as it is")
  end
  return nil
end

-- Why there is nothing to restore: no known-good snapshot, and this about the code.
local function nothing_to_restore(svc, state_root, c, no_code, spell)
  local code_part
  if no_code then
    code_part = spell.no_code .. " leaves the code as it is"
  elseif c.record then
    code_part = ("the deploy recorded in %s is already undone"):format(c.dir)
  elseif c.never_started then
    code_part = ("the deploy %s names never started changing files"):format(c.source)
  else
    code_part = ("no code deploy to undo (no %s or %s)"):format(
      state.pointer(state_root, svc.name, "inflight"), state.pointer(state_root, svc.name, "last"))
  end
  return ("nothing to restore for %s: no known-good snapshot of its definition (a successful run "
    .. "records one), and %s; the service was not touched"):format(svc.name, code_part)
end

-- rollback.run{ svc =, platform =, user =, manager =, state_root =, events_file =, deploy_record =,
--   no_code =, force =, reason =, view =, say =, warn =, spell =, services_file =, ssh_config = }
--   -> exit_code, message|nil, code|nil
-- Rolls svc back under the run lock of its host (see the top of this file for which deploy is
-- undone). A service with a host is rolled back there (rr.places): through that host's manager,
-- with the snapshots, deploy records, pointers, lock and journal of that host's state root, so
-- any engine host can do it; deploy_record then names a directory on that host.
--   0, nil                  rolled back and healthy
--   1, message, code        nothing was touched: ESTATE (the state root cannot be created, or its run
--                           lock cannot be taken for a reason other than another run), EMANAGER
--                           (the manager, or the service's host, cannot be reached),
--                           ELOCKED (another run holds the lock), EPOINTER, ERECORD (a pointer or the
--                           record cannot be read), ENOTHING (nothing to restore), EEVENTS
--   2, message, code        configuration, nothing touched: ENOWORKDIR (a deploy_record for a service
--                           without working_dir), EFOREIGN (the record is a deploy into another dir)
--   3, reason, "EROLLBACK"  flow.rollback failed: reason is its error; the manual steps were shown
--   4, message, "EINTERRUPTED"  an earlier run was killed mid-way: nothing touched (message: what
--                           it left and the command that resolves it)
-- manager: this machine's (nil opens and closes the user or system manager; not used for a
-- service on another host). state_root: this machine's (a host's is its own, rr.hostfs.state_root).
-- ssh_config: for a host (default $RR_SSH_CONFIG). events_file: default as rr.state (this machine's
-- event log, wherever the service is). view: an rr.ui for the events (default ui.new{}); say(line): progress lines (default
-- view:line); warn(message): a problem after the rollback (default stderr, "rrengine: ..."). spell:
-- how the messages name the caller's options, { no_code =, deploy_record =, named = } (required:
-- plans/rollback.lua gives "--no-code", "--deploy-record DIR", "--deploy-record"). Misuse raises.
function rollback.run(args)
  if type(args) ~= "table" or type(args.svc) ~= "table" then
    error("rollback.run: args.svc (a service of the platform) is required", 2)
  end
  if args.deploy_record and args.no_code then
    error("rollback.run: deploy_record and no_code contradict each other (undo that deploy, or leave the code)", 2)
  end
  local svc, no_code = args.svc, args.no_code and true or false
  local spell = args.spell
  if type(spell) ~= "table" then error("rollback.run: args.spell (the caller's option names) is required", 2) end
  for k in pairs(SPELL_KEYS) do
    if type(spell[k]) ~= "string" then error(("rollback.run: args.spell.%s must be a string"):format(k), 2) end
  end

  if svc.blue_green and no_code then
    return 2, ("service %q is blue-green: its rollback switches back to the release its other colour still has, "
      .. "and changes neither colour's code (%s goes with other services)"):format(svc.name, spell.no_code), "EBLUEGREEN"
  end
  if args.deploy_record and not svc.working_dir and not svc.blue_green then
    return 2, ("service %q has no working_dir: no deploy record can be its"):format(svc.name), "ENOWORKDIR"
  end

  -- The service's host (this machine, or the one it names): its manager, its files, its state
  -- root (where its snapshots, deploy records and journal are) and its run lock (rr.places).
  local set, perr, pcode = places.open({ hosts = { svc.host or false }, user = args.user, manager = args.manager,
    state_root = args.state_root, ssh_config = args.ssh_config })
  if not set then return 1, perr, pcode == "EHOST" and "EMANAGER" or pcode end
  local close_place <close> = set -- the lock released, a manager opened here closed, on every way out
  local place = set.list[1]
  local manager, state_root, hfs = place.manager, place.state_root, place.fs
  local explicit = args.deploy_record and state.canonical(args.deploy_record, hfs) or nil

  -- A run that was killed mid-way is resolved first (--recover), never around.
  local dead = journal.interrupted(state_root, { locked = true, fs = hfs })
  if dead then
    return 4, (svc.host and ("on host %s (%s):\n"):format(svc.host, state_root) or "")
      .. table.concat(journal.describe(dead, { unit_alive = journal.unit_alive_on(manager) }), "\n"), "EINTERRUPTED"
  end

  if svc.blue_green and explicit then return rollback.bluegreen_undo(args, place, explicit) end
  if svc.blue_green then return rollback.bluegreen(args, place, set.by) end

  local c, cerr, ccode = choose_record(svc, state_root, explicit, no_code, spell, hfs)
  if not c then return ccode == "EFOREIGN" and 2 or 1, cerr, ccode end
  local pointers_to_clear = pointers_naming(svc, state_root, c, hfs)

  local view = args.view or ui.new({})
  local say = args.say or function(text) view:line(text) end
  local warn = args.warn or function(text) io.stderr:write("rrengine: ", text, "\n") end

  local undo = announce(svc, state_root, c, no_code, spell, say, hfs)
  local known = snapshot.on(hfs).known_good(state_root, svc.name)
  if known then
    say(("definition: the known-good snapshot of run %s (%s), %s"):format(tostring(known.run),
      tostring(known.created), known.dir))
  end
  if not known and not undo then
    return 1, nothing_to_restore(svc, state_root, c, no_code, spell), "ENOTHING"
  end

  local stream, eerr = events.open({ path = args.events_file or state.events_file(args.user),
    view = function(ev) view:event(ev) end })
  if not stream then return 1, tostring(eerr), "EEVENTS" end
  -- The log closed on every way out, a raised error too (stream:close is idempotent; a stream
  -- has no __close of its own).
  local close_log <close> = setmetatable({}, { __close = function() stream:close() end })

  local ctx = { manager = manager, events = stream, state_root = state_root, user = args.user,
    platform = args.platform, opts = { force = args.force }, hooks_for = function() return nil end,
    hosts = set.by }
  -- An .inflight pointer naming another deploy than the one undone here must survive: it is the
  -- only trace of an unfinished deploy (rr.flow's rollback clears .inflight after any undo).
  local other_inflight = state.read_pointer(state_root, svc.name, "inflight", hfs)
  if other_inflight and (not c.dir or state.same_path(other_inflight, c.dir, hfs)) then
    other_inflight = nil
  end
  -- A rollback killed half-way is in the run journal like any run: --recover finishes it.
  local j, jerr = journal.create(state_root, { run = stream.run, services_file = args.services_file,
    user = args.user, order = { svc.name }, kind = "rollback", fs = hfs, host = svc.host })
  if not j then return 1, jerr, "EJOURNAL" end
  ctx.run_journal = j
  place.journal = j
  j:update(svc.name, { phase = "rollback", deploy_record = undo and undo.state_dir or nil })
  local rok, rerr = flow.rollback(ctx, svc, args.reason or "manual rollback", undo)
  j:close()
  stream:close()
  if other_inflight and not state.read_pointer(state_root, svc.name, "inflight", hfs) then
    state.write_pointer(state_root, svc.name, "inflight", other_inflight, hfs)
  end
  if not rok then return 3, tostring(rerr), "EROLLBACK" end
  for _, kind in ipairs(pointers_to_clear) do
    local rmok, rmerr = state.remove_pointer(state_root, svc.name, kind, hfs)
    if not rmok then
      warn(("rolled back, but cannot remove %s: %s"):format(state.pointer(state_root, svc.name, kind),
        tostring(rmerr)))
    end
  end
  return 0
end

-- A blue-green service back on the release before its last one (rr.bluegreen.rollback): its
-- other colour started, checked, given the traffic, the current one stopped. Called by
-- rollback.run under the run lock of the service's host (place, and hosts: rr.places's set.by);
-- returns as rollback.run (1 "EFAILED": it failed and was undone, traffic where it was; 3
-- "EROLLBACK": that undo failed too, the manual steps shown).
function rollback.bluegreen(args, place, hosts)
  local svc = args.svc
  local manager, state_root = place.manager, place.state_root
  local b, berr = balancer.open(svc.blue_green, nil)
  if not b then return 1, ("service %q: blue_green: %s"):format(svc.name, tostring(berr)), "EBALANCER" end
  local view = args.view or ui.new({})
  local warn = args.warn or function(text) io.stderr:write("rrengine: ", text, "\n") end
  local stream, eerr = events.open({ path = args.events_file or state.events_file(args.user),
    view = function(ev) view:event(ev) end })
  if not stream then return 1, tostring(eerr), "EEVENTS" end
  local close_log <close> = setmetatable({}, { __close = function() stream:close() end })
  local ctx = { manager = manager, events = stream, state_root = state_root, user = args.user,
    platform = args.platform, bluegreen_balancers = { [svc.name] = b }, services_file = args.services_file,
    opts = { force = args.force }, hooks_for = function() return nil end, hosts = hosts }
  local j, jerr = journal.create(state_root, { run = stream.run, services_file = args.services_file,
    user = args.user, order = { svc.name }, kind = "rollback", fs = place.fs, host = svc.host })
  if not j then return 1, jerr, "EJOURNAL" end
  ctx.run_journal = j
  place.journal = j
  local ok, err, manual = require("rr.bluegreen").rollback(ctx, svc, args.reason or "manual rollback")
  if ok or not manual then j:close() end
  stream:close()
  if ok then
    if err then warn(err) end
    return 0
  end
  if manual then return 3, tostring(err), "EROLLBACK" end
  return 1, tostring(err), "EFAILED"
end

-- The deploy a blue-green release made into a colour undone (--deploy-record DIR: the manual step
-- a failed blue-green rollback prints): only into a colour that is neither the recorded live one
-- nor running, on the service's host (place). Returns as rollback.run.
function rollback.bluegreen_undo(args, place, dir)
  local svc = args.svc
  local manager, state_root, hfs = place.manager, place.state_root, place.fs
  local deploys = deploy.on(hfs)
  local record, derr = deploys.load(dir)
  if not record then return 1, ("cannot read the deploy record %s: %s"):format(dir, tostring(derr)), "ERECORD" end
  local colour
  for _, c in ipairs({ "blue", "green" }) do
    if state.same_path(record.target, svc.blue_green[c].working_dir, hfs) then colour = c end
  end
  if not colour then
    return 2, ("the deploy record %s is a deploy into %s, not into a working_dir of %s"):format(dir,
      tostring(record.target), svc.name), "EFOREIGN"
  end
  local say = args.say or function(text) (args.view or ui.new({})):line(text) end
  if record.state == "undone" then
    say(("deploy record %s: already undone; the code is left as it is"):format(dir))
    return 0
  end
  if state.live_colour(state_root, svc.name, hfs) == colour then
    return 1, ("the deploy record %s went into %s's working dir, and %s is the live colour: switch the traffic and "
      .. "record the other colour live first"):format(dir, colour, colour), "ELIVE"
  end
  local unit = manager:unit(svc.blue_green[colour].unit)
  local active = unit and unit:get("ActiveState")
  if active ~= "inactive" and active ~= "failed" then
    return 1, ("%s is %s: stop it before its code is put back"):format(svc.blue_green[colour].unit,
      tostring(active)), "EACTIVE"
  end
  local ok, err = deploys.undo(record)
  if not ok then return 3, ("undo of the deploy %s failed: %s"):format(dir, tostring(err)), "EROLLBACK" end
  state.deploy_undone(state_root, svc.name, record.state_dir or dir, hfs)
  say(("deploy %s undone in %s (the %s colour)"):format(dir, record.target, colour))
  return 0
end

-- The held canaries of a group (plans/rolling.lua --canary-only) put back: each one drained, its
-- known-good definition from before the canary run restored (the record names it: the canary's
-- own successful flow made the new one known good), its deploy undone, started, checked, back in
-- rotation once healthy; then the record goes, and the group is on one release again.
--
-- rollback.group{ group =, platform =, user =, manager =, state_root =, events_file =, force =,
--   view =, say =, services_file =, ssh_config = } -> exit_code, message|nil, code|nil
-- A canary on a host is rolled back there (its manager, snapshots, deploy records, lock and
-- journal); the held record is this machine's (rr.canary).
--   0, message|nil          rolled back (message nil), or nothing held: message says so, nothing touched
--   1, message, code        nothing touched: ESTATE, EMANAGER, ELOCKED, EEVENTS, EJOURNAL, EBALANCER
--   2, message, "EUNKNOWN"  no such group in the services file
--   3, message, "EROLLBACK" a canary's rollback failed (the record stays, the message lists which)
--   4, message, "EINTERRUPTED"
function rollback.group(args)
  if type(args) ~= "table" or type(args.group) ~= "string" or type(args.platform) ~= "table" then
    error("rollback.group: args.group (a group name) and args.platform are required", 2)
  end
  local name, platform = args.group, args.platform
  local g = platform.groups and platform.groups[name]
  if not g then
    return 2, ("unknown group %q in %s"):format(name, tostring(args.services_file or platform.source)), "EUNKNOWN"
  end
  local state_root = args.state_root or state.root(args.user)
  local held = canary.held(state_root, name)
  if not held then
    return 0, ("group %s has no held canary (plans/rolling.lua --canary-only): nothing to roll back"):format(name)
  end

  -- This machine (the held record is here) and every host a held canary is on: its manager,
  -- files, state root (its snapshots and deploy records) and run lock (rr.places).
  local svcs = {}
  for _, n in ipairs(held.canaries or {}) do svcs[#svcs + 1] = platform.by_name[n] end
  local hosts = places.hosts(svcs)
  if hosts[1] ~= false then table.insert(hosts, 1, false) end
  local set, perr, pcode = places.open({ hosts = hosts, user = args.user, manager = args.manager,
    state_root = state_root, ssh_config = args.ssh_config })
  if not set then return 1, perr, pcode == "EHOST" and "EMANAGER" or pcode end
  local close_places <close> = set
  local deads = set:interrupted()
  if #deads > 0 then
    local lines = {}
    for _, d in ipairs(deads) do
      if d.place.host then lines[#lines + 1] = ("on host %s (%s):"):format(d.place.host, d.place.state_root) end
      for _, l in ipairs(journal.describe(d.data, { unit_alive = journal.unit_alive_on(d.place.manager) })) do
        lines[#lines + 1] = l
      end
    end
    return 4, table.concat(lines, "\n"), "EINTERRUPTED"
  end
  -- read again under the lock: a --promote that ran meanwhile released it
  held = canary.held(state_root, name)
  if not held then
    return 0, ("group %s has no held canary (plans/rolling.lua --canary-only): nothing to roll back"):format(name)
  end

  local balancers = {}
  if g.balancer then
    local b, berr = balancer.open(g, nil)
    if not b then return 1, ("group %q: %s"):format(name, tostring(berr)), "EBALANCER" end
    balancers[name] = b
  end

  local view = args.view or ui.new({})
  local say = args.say or function(text) view:line(text) end
  local stream, eerr = events.open({ path = args.events_file or state.events_file(args.user),
    view = function(ev) view:event(ev) end })
  if not stream then return 1, tostring(eerr), "EEVENTS" end
  local close_log <close> = setmetatable({}, { __close = function() stream:close() end })

  local list = {}
  for _, n in ipairs(held.canaries or {}) do
    if platform.by_name[n] then list[#list + 1] = n end
  end
  local ctx = { manager = set.by[false].manager, events = stream, state_root = state_root, user = args.user,
    platform = platform, balancers = balancers, opts = { force = args.force }, hooks_for = function() return nil end,
    hosts = set.by }
  -- a journal on each host, naming that host's canaries (as a rolling run's)
  local journals = {}
  for _, p in ipairs(set.list) do
    local order = {}
    for _, n in ipairs(list) do
      if (platform.by_name[n].host or false) == (p.host or false) then order[#order + 1] = n end
    end
    if #order > 0 then
      local jj, jerr = journal.create(p.state_root, { run = stream.run, services_file = args.services_file,
        user = args.user, order = order, kind = "rollback", fs = p.fs, host = p.host })
      if not jj then
        for _, other in pairs(journals) do other:close() end -- nothing was touched yet
        return 1, jerr, "EJOURNAL"
      end
      journals[p.host or false], p.journal = jj, jj
    end
  end
  ctx.run_journal = journals[false]

  say(("group %s: rolling back the canaries held since %s (run %s): %s"):format(name, tostring(held.passed_at),
    tostring(held.run), table.concat(list, ", ")))
  local failed = {}
  for _, n in ipairs(list) do
    local svc = platform.by_name[n]
    local p = set.by[svc.host or false]
    local j, hfs = journals[svc.host or false], p.fs
    -- the definition known good before the canary's run, when the record names one that is not
    -- the known-good one now
    local before = held.known_good and held.known_good[n]
    local snap, changed = canary.put_back_known_good(p.state_root, n, before, hfs)
    if snap and changed then
      say(("%s: definition: the known-good snapshot from before the canary (%s)"):format(n, snap.dir))
    elseif before and not snap then
      say(("%s: the known-good snapshot from before the canary (%s) is gone: %s; the current known good is "
        .. "restored"):format(n, before, tostring(changed)))
    end
    -- the canary's deploy: the one its run recorded, else the last one its pointer names
    local dir = held.deploys and held.deploys[n]
    if not dir then dir = state.read_pointer(p.state_root, n, "last", hfs) end
    local record
    if dir and hfs.exists(dir .. "/deploy.json") then
      local r, derr = deploy.on(hfs).load(dir)
      if not r then
        failed[#failed + 1] = ("%s: cannot read its deploy record %s: %s"):format(n, dir, tostring(derr))
        goto next
      end
      if r.state ~= "undone" then record = r end
    end
    j:update(n, { phase = "rollback", deploy_record = record and record.state_dir or nil })
    do
      local ok, err = flow.rollback(ctx, svc, ("the held canary of group %s is rolled back (plans/rollback.lua "
        .. "--group)"):format(name), record)
      j:finished(n, ok and true or false)
      if not ok then failed[#failed + 1] = ("%s: %s"):format(n, tostring(err)) end
    end
    ::next::
  end
  for _, jj in pairs(journals) do jj:close() end
  if #failed > 0 then
    return 3, table.concat(failed, "; "), "EROLLBACK"
  end
  local ok, rerr = canary.release(state_root, name)
  if not ok and fs.exists(state_root .. "/canary/" .. name .. ".json") then
    return 1, ("rolled back, but cannot remove the held record of group %s: %s"):format(name, tostring(rerr)), "ESTATE"
  end
  return 0
end

return rollback
