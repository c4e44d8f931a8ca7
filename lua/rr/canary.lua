-- rr.canary: a replica group's canary. The group's first members roll first; then, for `soak`
-- seconds, they are watched while they serve: their units (leaving active, a restart by
-- systemd, a new main process), their health probe, and an optional analysis function (e.g.
-- the canaries' error rate against the old members'). The first sign of trouble ends the soak;
-- the runner (rr.rolling) then rolls the canaries back and never touches the rest of the group.
-- A canary that passed can be held there (--canary-only): the state directory records it, and
-- --promote rolls the rest with the same release later.
local rr = require("rr")
local fs = require("rr.fs")
local cjson = require("cjson")
local health = require("rr.health")
local chunk = require("rr.chunk")
local hooks = require("rr.hooks")
local state = require("rr.state")
local snapshot = require("rr.snapshot")
local flow = require("rr.flow")

local canary = {}

local json = cjson.new()

-- The members that go first: the group's first `count_members` selected members.
function canary.members(group, selected)
  local out = {}
  local want = group.canary and group.canary.count_members or 0
  for _, name in ipairs(group.members) do
    if #out >= want then break end
    if selected == nil or selected[name] then out[#out + 1] = name end
  end
  return out
end

-- canary.load_analysis(path) -> fn | nil, message, CODE: the file returns the analysis function.
function canary.load_analysis(path)
  local ok, fn, code = chunk.load(path, { env = hooks.environment(), seconds = hooks.LOAD_TIMEOUT })
  if not ok then return nil, ("canary analysis %s: %s"):format(path, tostring(fn)), code end
  if type(fn) ~= "function" then
    return nil, ("canary analysis %s must return a function, got %s"):format(path, type(fn)), "EINVAL"
  end
  return fn
end

local function describe(svc)
  return { name = svc.name, unit = svc.unit, url = svc.health and svc.health.url or nil,
    server = svc.balancer_server or svc.name }
end

-- canary.soak{ group =, canaries = {svc}, others = {svc}, manager =, analysis = fn|nil,
--   emit = fn(name, fields) } -> true | nil, reason
function canary.soak(args)
  local g = args.group
  local soak = g.canary.soak or 0
  local deadline = rr.now() + soak
  local interval = math.max(0.05, math.min(5, soak / 4))
  local watchers = {}
  local final_look
  for _, svc in ipairs(args.canaries) do
    local unit, uerr = args.manager:unit(svc.unit)
    if not unit then return nil, ("cannot watch canary %s: %s"):format(svc.name, tostring(uerr)) end
    local base, berr = unit:properties()
    if not base then return nil, ("cannot read canary %s: %s"):format(svc.name, tostring(berr)) end
    if base.ActiveState ~= "active" then
      return nil, ("canary %s is %s at the start of the soak"):format(svc.name, tostring(base.ActiveState))
    end
    -- its unit: compared with base, so nothing between the read and the wait is missed
    watchers[#watchers + 1] = function()
      local p, err, code = unit:wait_change({ "ActiveState", "MainPID", "NRestarts" },
        math.max(deadline - rr.now(), 0.001), base)
      if not p then
        if code == "ETIMEDOUT" then return "pass" end
        return ("cannot watch canary %s: %s"):format(svc.name, tostring(err))
      end
      if p.ActiveState ~= "active" then
        return ("canary %s left active (%s)"):format(svc.name, tostring(p.ActiveState))
      elseif (p.NRestarts or 0) > (base.NRestarts or 0) then
        return ("canary %s was restarted by systemd (NRestarts %d -> %d)"):format(svc.name, base.NRestarts or 0,
          p.NRestarts)
      end
      if p.MainPID == 0 then
        return ("canary %s: its main process exited (MainPID %s -> 0)"):format(svc.name, tostring(base.MainPID))
      end
      return ("canary %s changed its main process (MainPID %s -> %s)"):format(svc.name, tostring(base.MainPID),
        tostring(p.MainPID))
    end
    -- its health, while it serves
    if svc.health and svc.health.kind == "http" then
      watchers[#watchers + 1] = function()
        while rr.now() < deadline do
          rr.sleep(math.min(interval, math.max(deadline - rr.now(), 0)))
          if rr.now() >= deadline then return "pass" end
          local kind, detail = health.probe(svc.health, math.min(math.max(svc.health.interval, 1), 5))
          if kind ~= "healthy" then
            return ("canary %s: probe failed during the soak: %s"):format(svc.name, detail)
          end
        end
        return "pass"
      end
    end
  end
  if args.analysis then
    local info = { group = g.name, soak = soak, canaries = {}, others = {} }
    for _, svc in ipairs(args.canaries) do info.canaries[#info.canaries + 1] = describe(svc) end
    for _, svc in ipairs(args.others) do info.others[#info.others + 1] = describe(svc) end
    local t0 = rr.now()
    local function analyze()
      info.elapsed = rr.now() - t0
      -- a bounded task: an analysis stuck in a loop (or a hung metrics endpoint) is a failure
      local task = rr.spawn(args.analysis, info):deadline(math.max(interval * 2, 10))
      local ok, verdict, why = rr.join(task)
      if not ok then return ("analysis error: %s"):format(tostring(verdict)) end
      if verdict ~= true then
        return ("analysis: %s"):format(why and tostring(why) or ("returned " .. tostring(verdict)))
      end
    end
    watchers[#watchers + 1] = function()
      while rr.now() < deadline do
        rr.sleep(math.min(interval, math.max(deadline - rr.now(), 0)))
        if rr.now() >= deadline then break end
        local failure = analyze()
        if failure then return failure end
      end
      return "pass"
    end
    final_look = analyze
  end
  -- every watcher ends by the deadline at the latest: the first failure wins, and the soak
  -- passes only when the deadline came with none
  while true do
    local i, result = rr.race(watchers)
    if i == nil then return nil, "cannot watch the canaries: " .. tostring(result) end
    if result ~= "pass" then return nil, result end
    table.remove(watchers, i)
    if #watchers == 0 or rr.now() >= deadline then
      if final_look then
        local failure = final_look()
        if failure then return nil, failure end
      end
      return true
    end
  end
end

-- The name of a snapshot directory (what the held record and the run keep per canary).
function canary.snapshot_name(dir)
  return type(dir) == "string" and dir:match("[^/]+$") or nil
end

-- canary.put_back_known_good(root, name, before) -> snap, changed | nil, message
-- A canary's own successful flow made its new definition the known good one; a canary rolled
-- back must get the definition known good before the canary run (`before`, a snapshot name)
-- back, and the known-good pointer with it. nil `before`: nothing was known good before, the
-- pointer is left as it is (snap nil, changed false).
function canary.put_back_known_good(root, name, before)
  if not before then return nil, false end
  local now = snapshot.known_good(root, name)
  if now and canary.snapshot_name(now.dir) == before then return now, false end
  local snap, err = snapshot.promote(root, name, { name = before })
  if not snap then return nil, err end
  return snap, true
end

-- canary.roll_back(ctx, svc, args) -> true | nil, message, manual_steps
-- One canary back on the release it had: the definition known good before the canary run
-- (args.before) becomes the known good one again and is restored, its deploy (args.record)
-- undone; a replica is drained first and back in rotation once healthy (rr.flow.rollback).
-- args = { reason =, record = deploy record | nil, before = snapshot name | nil, group = name }
function canary.roll_back(ctx, svc, args)
  local snap, changed = canary.put_back_known_good(ctx.state_root, svc.name, args.before)
  if snap and changed then
    ctx.events:emit("KNOWN_GOOD_RESTORED", { service = svc.name, unit = svc.unit, snapshot = snap.dir,
      reason = ("the definition known good before the canary of group %s"):format(tostring(args.group)) })
  elseif args.before and not snap then
    ctx.events:emit("WARNING", { service = svc.name, unit = svc.unit, warning = ("the known-good snapshot from "
      .. "before the canary (%s) cannot be made the known good one again: %s; the current known good is restored")
      :format(args.before, tostring(changed)) })
  end
  return flow.rollback(ctx, svc, args.reason, args.record)
end

-- The canary record of a group held after its canary (--canary-only).
local function record_path(root, group)
  return ("%s/canary/%s.json"):format(root, group)
end

-- canary.hold(root, group, info) -> true | nil, message, CODE
function canary.hold(root, group, info)
  local ok, err, code = fs.mkdir_p(root .. "/canary", 448, state.under(root))
  if not ok then return nil, err, code end
  return fs.write_atomic(record_path(root, group), json.encode(info) .. "\n", { mode = 384, under = root })
end

-- canary.held(root, group) -> record | nil
function canary.held(root, group)
  local text = fs.read(record_path(root, group))
  if not text then return nil end
  local ok, rec = pcall(json.decode, text)
  if ok and type(rec) == "table" then return rec end
  return nil
end

-- canary.release(root, group): the group was promoted (or its canaries rolled back).
function canary.release(root, group)
  return fs.remove(record_path(root, group), state.under(root))
end

-- canary.all_held(root) -> { [group] = record }
function canary.all_held(root)
  local out = {}
  for _, name in ipairs(fs.list(root .. "/canary") or {}) do
    local group = name:match("^(.+)%.json$")
    if group then out[group] = canary.held(root, group) end
  end
  return out
end

return canary
