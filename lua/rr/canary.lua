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
local chunk = require("rr.chunk")
local hooks = require("rr.hooks")
local state = require("rr.state")
local snapshot = require("rr.snapshot")
local flow = require("rr.flow")
local soak = require("rr.soak")

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

-- canary.soak{ group =, canaries = {svc}, others = {svc}, ctx = | manager =, analysis = fn|nil,
--   emit = fn(name, fields) } -> true | nil, reason
-- Every canary's unit and probe are watched (rr.soak), and the analysis sees the group. A
-- canary's unit is its host's (rr.flow.place(ctx, svc)); without ctx, all are manager's.
function canary.soak(args)
  local g = args.group
  local s = soak.new(g.canary.soak or 0)
  for _, svc in ipairs(args.canaries) do
    local manager = args.ctx and flow.place(args.ctx, svc).manager or args.manager
    local unit, uerr
    if manager then
      unit, uerr = manager:unit(svc.unit)
    else
      uerr = "host " .. tostring(svc.host) .. " cannot be reached"
    end
    if not unit then return nil, ("cannot watch canary %s: %s"):format(svc.name, tostring(uerr)) end
    local ok, why = s:unit(unit, "canary " .. svc.name)
    if not ok then return nil, why end
    s:probe(svc.health, "canary " .. svc.name)
  end
  if args.analysis then
    local info = { group = g.name, soak = s.seconds, canaries = {}, others = {} }
    for _, svc in ipairs(args.canaries) do info.canaries[#info.canaries + 1] = describe(svc) end
    for _, svc in ipairs(args.others) do info.others[#info.others + 1] = describe(svc) end
    s:analysis(args.analysis, info)
  end
  return s:run("the canaries")
end

-- The name of a snapshot directory (what the held record and the run keep per canary).
function canary.snapshot_name(dir)
  return type(dir) == "string" and dir:match("[^/]+$") or nil
end

-- canary.put_back_known_good(root, name, before[, hfs]) -> snap, changed | nil, message
-- A canary's own successful flow made its new definition the known good one; a canary rolled
-- back must get the definition known good before the canary run (`before`, a snapshot name)
-- back, and the known-good pointer with it. nil `before`: nothing was known good before, the
-- pointer is left as it is (snap nil, changed false). root and hfs (rr.hostfs, default this
-- machine's) are the canary's host's: its snapshots are there.
function canary.put_back_known_good(root, name, before, hfs)
  if not before then return nil, false end
  local snaps = snapshot.on(hfs)
  local now = snaps.known_good(root, name)
  if now and canary.snapshot_name(now.dir) == before then return now, false end
  local snap, err = snaps.promote(root, name, { name = before })
  if not snap then return nil, err end
  return snap, true
end

-- canary.roll_back(ctx, svc, args) -> true | nil, message, manual_steps
-- One canary back on the release it had, on its host (rr.flow.place): the definition known good before the canary run
-- (args.before) becomes the known good one again and is restored, its deploy (args.record)
-- undone; a replica is drained first and back in rotation once healthy (rr.flow.rollback).
-- args = { reason =, record = deploy record | nil, before = snapshot name | nil, group = name }
function canary.roll_back(ctx, svc, args)
  local place = flow.place(ctx, svc)
  local snap, changed = canary.put_back_known_good(place.state_root, svc.name, args.before, place.fs)
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

-- The canary record of a group held after its canary (--canary-only). It is the run's, not a
-- host's: a group's canaries may be on several hosts, and --promote and status read it where the
-- engine runs; what it names per canary (the deploy record, the known-good snapshot) is on that
-- canary's host.
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
