-- rr.places: the hosts an acting entry point works on, opened once. Each host (this machine,
-- false, or a remote one by name) becomes a place (rr.flow.place's shape): its manager, its files
-- (rr.hostfs), its state root, and the run lock held there. plans/rolling.lua, plans/rollback.lua
-- and the REPL open hosts through here, so that a service on another host is acted on through
-- that host's manager, files and lock, and any engine host finds its records there.
local rr = require("rr")
local fs = require("rr.fs")
local systemd = require("rr.systemd")
local state = require("rr.state")
local hostfs = require("rr.hostfs")
local remote = require("rr.remote")
local journal = require("rr.journal")

local places = {}

-- places.hosts(list) -> { false?, host, ... }: the hosts of a list of services, this machine
-- (false) first when one of them has no host, then each host in the order of first appearance.
-- An empty list is this machine.
function places.hosts(list)
  local out, seen, here = {}, {}, false
  for _, svc in ipairs(list) do
    if not svc.host then
      here = true
    elseif not seen[svc.host] then
      seen[svc.host] = true
      out[#out + 1] = svc.host
    end
  end
  if here or #out == 0 then table.insert(out, 1, false) end
  return out
end

local Set = {}
Set.__index = Set

-- set:close(): every lock released and every manager opened here closed (idempotent).
function Set:close()
  for _, p in ipairs(self.list) do
    if p.lock then p.lock:unlock(); p.lock = nil end
    if p.opened then p.opened:close(); p.opened = nil end
  end
end
Set.__close = Set.close

-- set:interrupted() -> { { place =, data = }, ... }: the journals of runs that died, on every
-- place (under the lock, a journal there is a dead run's; without it, one whose writer is gone,
-- or any journal on a remote host: see rr.journal).
function Set:interrupted()
  local out = {}
  for _, p in ipairs(self.list) do
    local d = journal.interrupted(p.state_root, { locked = p.lock ~= nil, fs = p.fs })
    if d then out[#out + 1] = { place = p, data = d } end
  end
  return out
end

-- Opens every place of set (places.open's work) -> true | nil, message, CODE.
local function open_all(set, opts)
  local lock = opts.lock ~= false
  local remote_hosts = {}
  for _, host in ipairs(opts.hosts) do
    local p = { host = host or nil }
    set.by[host] = p
    set.list[#set.list + 1] = p
    if host then remote_hosts[#remote_hosts + 1] = host end
  end
  local here = set.by[false]
  if here then
    here.fs = hostfs.here()
    here.state_root = opts.state_root or state.root(opts.user)
    here.manager = opts.manager
    if not here.manager then
      local m, merr = (opts.user and systemd.user or systemd.system)()
      if not m then return nil, tostring(merr), "EMANAGER" end
      here.manager, here.opened = m, m
    end
    if lock then
      local mok, merr = fs.mkdir_p(here.state_root, 448)
      if not mok then return nil, ("cannot create %s: %s"):format(here.state_root, tostring(merr)), "ESTATE" end
      local path = state.lock_path(here.state_root)
      local l, lerr, lcode = fs.lock(path)
      if not l then
        if lcode == "EWOULDBLOCK" then
          return nil, ("another rrengine run holds the lock on this manager (%s): %s"):format(path, tostring(lerr)),
            "ELOCKED"
        end
        -- a full disk (ENOSPC), no permission: not another run
        return nil, ("cannot take the run lock (%s): %s"):format(path, tostring(lerr)), "ESTATE"
      end
      here.lock = l
    end
  end
  if #remote_hosts == 0 then return true end
  local ssh_config = opts.ssh_config
  -- the handles hostfs.get makes from now on use it
  if ssh_config then hostfs.configure({ ssh_config = ssh_config }) end
  local tasks = {}
  for i, host in ipairs(remote_hosts) do
    tasks[i] = rr.spawn(function()
      local p = set.by[host]
      p.fs = hostfs.get(host)
      local m, merr = systemd.remote(host, { user = opts.user or false, ssh_config = ssh_config })
      if not m then return nil, merr end
      p.manager, p.opened = m, m
      p.state_root = opts.host_state_root or hostfs.state_root(p.fs, opts.user)
      if not lock then return true end
      local dok, derr = p.fs.mkdir_p(p.state_root, 448)
      if not dok then return nil, ("cannot create %s on %s: %s"):format(p.state_root, host, tostring(derr)), "ESTATE" end
      local l, lerr, lcode = remote.lock(host, { ssh_config = ssh_config, path = state.lock_path(p.state_root) })
      if not l then
        if lcode == "EWOULDBLOCK" then
          return nil, ("another rrengine run holds the lock on %s (%s): %s"):format(host,
            state.lock_path(p.state_root), lerr), "ELOCKED"
        end
        return nil, lerr
      end
      p.lock = l
      return true
    end)
  end
  local problems, worst = {}, nil
  for i, r in ipairs(rr.wait(tasks)) do
    -- r = { ok, results... } per task
    if not r[1] then
      problems[#problems + 1] = ("%s: %s"):format(remote_hosts[i], tostring(r[2]))
    elseif not r[2] then
      problems[#problems + 1] = tostring(r[3])
      if r[4] == "ELOCKED" or (r[4] == "ESTATE" and worst ~= "ELOCKED") then worst = r[4] end
    end
  end
  if #problems > 0 then return nil, table.concat(problems, "\n"), worst or "EHOST" end
  return true
end

-- places.open(opts) -> set | nil, message, CODE
-- opts = { hosts = { false | host, ... } (places.hosts), user =, manager = (this machine's, used
-- as it is and not closed), state_root = (this machine's; default rr.state.root(user)),
-- host_state_root = (every remote host's; default hostfs.state_root), ssh_config =, lock = false
-- (read only: no lock, no state root created) }.
-- Remote hosts are opened at once, one task each. set.by[host or false] = place, set.list = the
-- places in opts.hosts's order; place = { host (nil here), manager, opened (closed by
-- set:close), fs, state_root, lock }. Nothing stays open on a failure.
--   EMANAGER  this machine's manager cannot be reached
--   ESTATE    a state root cannot be created, or its lock taken for another reason than a run
--   ELOCKED   another run holds a lock (the message names the host and the holder)
--   EHOST     a remote host cannot be opened (the message names each one and why)
function places.open(opts)
  if type(opts) ~= "table" or type(opts.hosts) ~= "table" then
    error("rr.places.open: opts.hosts (a list of hosts, false for this machine) is required", 2)
  end
  local set = setmetatable({ by = {}, list = {} }, Set)
  -- nothing stays open on a failure, a raised error (a cancelled task) too
  local opened = false
  local guard <close> = setmetatable({}, { __close = function() if not opened then set:close() end end })
  local ok, err, code = open_all(set, opts)
  if not ok then return nil, err, code end
  opened = true
  return set
end

return places
