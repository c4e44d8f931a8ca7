-- Status of every service: unit state and health, one look each, all at once, on every host.
-- Health probes (HTTP) go out from this machine, wherever the service runs.
local rr = require("rr")
local health = require("rr.health")
local systemd = require("rr.systemd")

local status = {}

-- status.collect(manager, services) -> list of { name, unit, active, sub, pid, restarts, health, detail }
function status.collect(manager, list)
  local tasks = {}
  for i, svc in ipairs(list) do
    tasks[i] = rr.spawn(function()
      local unit, err = manager:unit(svc.unit)
      local props
      if unit then
        props, err = unit:properties()
      end
      if not props then
        return { name = svc.name, unit = svc.unit, active = "?", sub = "?", health = "unknown", detail = err }
      end
      local kind, detail = health.snapshot(unit, svc.health)
      return { name = svc.name, unit = svc.unit, active = props.ActiveState, sub = props.SubState,
        pid = props.MainPID, restarts = props.NRestarts, health = kind, detail = detail,
        load = props.LoadState, stale = props.NeedDaemonReload }
    end)
  end
  local rows = {}
  for i, r in ipairs(rr.wait(tasks)) do
    rows[i] = r[1] and r[2] or { name = list[i].name, unit = list[i].unit, active = "?", sub = "?",
      health = "unknown", detail = tostring(r[2]) }
  end
  return rows
end

-- status.expand(list, state_root[, {user =, ssh_config =}]) -> list: a blue-green service becomes one entry per colour
-- (its instance and health), named "NAME [COLOUR, live]" or "NAME [COLOUR, idle]" from the live
-- colour recorded under state_root ("NAME [COLOUR]" when none is recorded); other services as
-- they are.
function status.expand(list, state_root, opts)
  opts = opts or {}
  local out = {}
  local handles = {} -- host -> { fs, root } | false (cannot be read)
  local function live_colour(svc)
    if not svc.host then
      return state_root and require("rr.state").live_colour(state_root, svc.name)
    end
    -- a service on a host: its record is that host's (bounded: a host that does not answer
    -- leaves the colours unnamed, and its row says why)
    local hh = handles[svc.host]
    if hh == nil then
      local hostfs = require("rr.hostfs")
      local h = hostfs.remote(svc.host, { ssh_config = opts.ssh_config, timeout = 10 })
      local ok, root = pcall(hostfs.state_root, h, opts.user)
      hh = ok and { fs = h, root = root } or false
      handles[svc.host] = hh
    end
    return hh and require("rr.state").live_colour(hh.root, svc.name, hh.fs)
  end
  for _, svc in ipairs(list) do
    if svc.blue_green then
      local live = live_colour(svc)
      for _, colour in ipairs({ "blue", "green" }) do
        local c = svc.blue_green[colour]
        local entry = {}
        for k, v in pairs(svc) do entry[k] = v end
        entry.unit, entry.health, entry.blue_green = c.unit, c.health, nil
        entry.name = ("%s [%s%s]"):format(svc.name, colour, live and (live == colour and ", live" or ", idle") or "")
        entry.colour, entry.live = colour, live == colour
        out[#out + 1] = entry
      end
    else
      out[#out + 1] = svc
    end
  end
  return out
end

-- The hosts of a list of services, in order of first appearance, this machine (false) first
-- when any service is on it.
function status.hosts(list)
  local order, seen, here = {}, {}, false
  for _, svc in ipairs(list) do
    if svc.host == nil then
      here = true
    elseif not seen[svc.host] then
      seen[svc.host] = true
      order[#order + 1] = svc.host
    end
  end
  if here then table.insert(order, 1, false) end
  return order
end

local CONNECT_TIMEOUT = 10

-- status.collect_hosts(list, opts) -> rows, unreachable (the hosts that could not be reached,
-- host -> message): the rows of status.collect for services on any host, grouped by host (this
-- machine first, then each host in the order the list names it), each with `host` (nil: this
-- machine). One manager per host, all opened at once in tasks of their own and closed before it
-- returns; a host that cannot be reached within opts.timeout gives a row per service saying so
-- (health "unknown", detail "host H unreachable: ..."), never a wait without end.
-- opts: manager (this machine's, used as it is, not closed) or user (which manager: here and on
-- every host); ssh_config (rr.systemd.remote's); timeout (seconds to connect to a host, 10).
function status.collect_hosts(list, opts)
  opts = opts or {}
  local hosts = status.hosts(list)
  local by_host = {}
  for _, svc in ipairs(list) do
    local key = svc.host or false
    by_host[key] = by_host[key] or {}
    table.insert(by_host[key], svc)
  end
  local tasks = {}
  for i, host in ipairs(hosts) do
    tasks[i] = rr.spawn(function()
      local m, err
      if host == false then
        m = opts.manager
        if not m then
          m, err = (opts.user and systemd.user or systemd.system)()
        end
      else
        m, err = systemd.remote(host, { user = opts.user or false, ssh_config = opts.ssh_config,
          timeout = opts.timeout or CONNECT_TIMEOUT })
      end
      if not m then return nil, err end
      local ok, rows = pcall(status.collect, m, by_host[host])
      if m ~= opts.manager then m:close() end
      if not ok then error(rows, 0) end
      return rows
    end)
  end
  local rows, unreachable = {}, {}
  for i, r in ipairs(rr.wait(tasks)) do
    local host = hosts[i]
    local got = r[1] and r[2]
    if not got then
      local why = r[1] and r[3] or r[2]
      local detail = host and ("host %s unreachable: %s"):format(host, tostring(why))
        or ("this machine's manager: %s"):format(tostring(why))
      if host then unreachable[host] = detail end
      got = {}
      for j, svc in ipairs(by_host[host]) do
        got[j] = { name = svc.name, unit = svc.unit, active = "?", sub = "?", health = "unknown", detail = detail,
          unreachable = host and true or nil }
      end
    end
    for _, row in ipairs(got) do
      row.host = host or nil
      rows[#rows + 1] = row
    end
  end
  return rows, unreachable
end

-- status.journals(list, opts) -> { { host =, root =, look = (rr.journal.look) }, ... }: the run
-- journal of this machine and of every host of list, looked at read-only (no lock), in
-- status.hosts's order; only those where a journal was found. opts: user, ssh_config, skip =
-- { [host] = true } (hosts known unreachable: not asked again), state_root (this machine's).
function status.journals(list, opts)
  opts = opts or {}
  local journal = require("rr.journal")
  local hostfs = require("rr.hostfs")
  local found = {}
  local tasks, hosts = {}, {}
  for _, host in ipairs(status.hosts(list)) do
    if not (host and opts.skip and opts.skip[host]) then
      hosts[#hosts + 1] = host
      tasks[#tasks + 1] = rr.spawn(function()
        if not host then
          local root = opts.state_root or require("rr.state").root(opts.user)
          return root, journal.look(root)
        end
        -- a handle of its own: a short bound, for a host that stops answering now
        local h = hostfs.remote(host, { ssh_config = opts.ssh_config, timeout = 30 })
        local root = hostfs.state_root(h, opts.user)
        return root, journal.look(root, h)
      end)
    end
  end
  for i, r in ipairs(rr.wait(tasks)) do
    if r[1] and r[3] then found[#found + 1] = { host = hosts[i] or nil, root = r[2], look = r[3] } end
  end
  return found
end

-- The rows as a table; a HOST column ("local" for this machine) when any row has a host.
function status.format(rows)
  local remote = false
  for _, r in ipairs(rows) do
    if r.host then remote = true end
  end
  local function host_col(h)
    return remote and ("%-20s "):format(h) or ""
  end
  local lines = { host_col("HOST") .. ("%-24s %-36s %-10s %-10s %8s  %s"):format("SERVICE", "UNIT", "STATE", "SUB",
    "PID", "HEALTH") }
  for _, r in ipairs(rows) do
    lines[#lines + 1] = host_col(r.host or "local") .. ("%-24s %-36s %-10s %-10s %8s  %s (%s)%s"):format(r.name,
      r.unit, r.active, r.sub, tostring(r.pid or "-"), r.health, tostring(r.detail),
      r.stale and "  [unit file changed on disk]" or "")
  end
  return table.concat(lines, "\n")
end

-- status.held(state_root[, opts]) -> { line, ... }: the groups held after their canary
-- (plans/rolling.lua --canary-only), on purpose on two releases, each with both ways on:
-- promote the rest, or put the canaries back. opts.services_file / opts.user: as the commands
-- an operator pastes must say them.
function status.held(state_root, opts)
  opts = opts or {}
  local tail = ""
  if opts.services_file then
    local f = tostring(opts.services_file)
    if not f:match("^[%w%._/:@%%+=,-]+$") then f = "'" .. f:gsub("'", "'\\''") .. "'" end
    tail = tail .. " --services " .. f
  end
  if opts.user then tail = tail .. " --user" end
  local held, names = require("rr.canary").all_held(state_root), {}
  for group in pairs(held) do names[#names + 1] = group end
  table.sort(names)
  local lines = {}
  for _, group in ipairs(names) do
    local rec = held[group]
    lines[#lines + 1] = ("group %s: canary held since %s: %s on the new release, the rest not yet: promote with "
      .. "rrengine plans/rolling.lua --promote%s, or roll the canaries back with rrengine plans/rollback.lua --group "
      .. "%s%s"):format(group, tostring(rec.passed_at), table.concat(rec.canaries or {}, ", "), tail, group, tail)
  end
  return lines
end

return status
