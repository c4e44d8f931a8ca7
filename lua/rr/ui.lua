-- What the operator sees while a plan runs. On a terminal: a live line with the service in
-- flight, its step and the elapsed time, above it one line per finished step. Elsewhere (CI,
-- a pipe, a log file): one plain, timestamped line per step. Events drive both.
local rr = require("rr")
local log = require("rr.log")

local ui = {}
ui.__index = ui

local function isatty(file)
  return require("rr.fs").isatty(file == io.stderr and 2 or 1)
end

-- ui.new{ out = io.stdout|io.stderr, live = bool|nil (auto), quiet = bool }
function ui.new(opts)
  opts = opts or {}
  local out = opts.out or io.stdout
  local self = setmetatable({ out = out, quiet = opts.quiet, inflight = {}, width = 0 }, ui)
  if opts.live == nil then
    self.live = isatty(out) and os.getenv("TERM") ~= "dumb"
  else
    self.live = opts.live
  end
  return self
end

local function fmt_ms(ms)
  if not ms then return "" end
  if ms < 1000 then return ("%d ms"):format(ms) end
  return ("%.1f s"):format(ms / 1000)
end

local function clock()
  return log.timestamp():sub(12, 23)
end

function ui:clear_live()
  if self.live and self.width > 0 then
    -- clear to the end of the line: right whatever the terminal's width is now
    self.out:write("\r\27[K")
    self.width = 0
  end
end

local function fmt_duration(secs)
  secs = math.floor(secs + 0.5)
  if secs < 60 then return ("%ds"):format(secs) end
  if secs < 3600 then return ("%dm%02ds"):format(secs // 60, secs % 60) end
  return ("%dh%02dm"):format(secs // 3600, (secs % 3600) // 60)
end

-- The terminal's width now (a resize is seen at the next redraw), or 80.
function ui:columns()
  local fs = require("rr.fs")
  local cols = fs.term_size(self.out == io.stderr and 2 or 1)
  return cols or 80
end

-- Cuts text to n display columns, with "…" where it was cut.
local function fit(text, n)
  local len = utf8.len(text) or #text
  if len <= n then return text end
  if n <= 1 then return "" end
  local cut = utf8.offset(text, n) or (n + 1)
  return text:sub(1, cut - 1) .. "…"
end
ui.fit = fit

-- Expected seconds left: the remaining services' durations from earlier runs (the event log),
-- else this run's average so far, spread over the services that can run at once. nil when
-- nothing is known yet.
function ui:eta()
  local p = self.progress
  if not p or not p.order then return nil end
  local left, unknown, known_sum, known_n = 0, 0, 0, 0
  for _, ms in pairs(p.took) do known_sum, known_n = known_sum + ms, known_n + 1 end
  local avg = known_n > 0 and known_sum / known_n or nil
  local now = rr.now()
  for _, name in ipairs(p.order) do
    if not p.finished[name] then
      local expect = p.history[name] or avg
      if not expect then unknown = unknown + 1 else
        local s = self.inflight[name]
        local spent = s and (now - s.since) * 1000 or 0
        left = left + math.max(expect - spent, 0)
      end
    end
  end
  if unknown > 0 and not avg then return nil end
  local width = math.max(1, math.min(p.parallel or 1, #p.order - p.done))
  return left / 1000 / width
end

-- A platform on several hosts: each line about a service starts with its host, in a column
-- (services of this machine say "local"), and the counts go per host. Without any remote
-- service, the lines are as they always were.
ui.LOCAL = "local"

-- The host column of a service ("" on a one-machine platform, or a line about no service).
function ui:host_column(name)
  local p = self.progress
  if not p or not p.hosts or not name then return "" end
  return ("%-" .. p.host_width .. "s  "):format(p.hosts[name] or ui.LOCAL)
end

-- "h1 1/3, h2 0/1, local 1/1": the services done per host against each host's total.
function ui:host_counts()
  local p = self.progress
  if not p or not p.hosts then return nil end
  local parts = {}
  for _, host in ipairs(p.host_list) do
    parts[#parts + 1] = ("%s %d/%d"):format(host, p.host_done[host] or 0, p.host_total[host])
  end
  return table.concat(parts, ", ")
end

function ui:progress_text()
  local p = self.progress
  if not p then return "" end
  local text = ("[%d/%d] %s"):format(p.done, p.total, fmt_duration(rr.now() - p.t0))
  local eta = self:eta()
  if eta then text = text .. (", ~%s left"):format(fmt_duration(eta)) end
  local hosts = self:host_counts()
  if hosts then text = text .. " · " .. hosts end
  return text
end

function ui:draw_live()
  -- the live line lives only while the run's ticker does: after it, lines are final
  if not self.live or self.ended then return end
  local parts = {}
  local now = rr.now()
  local hosts = self.progress and self.progress.hosts
  for name, s in pairs(self.inflight) do
    -- by host first: an operator finds a host's services side by side
    local where = hosts and ((hosts[name] or s.host or ui.LOCAL) .. " ") or ""
    parts[#parts + 1] = ("%s%s: %s %.1fs"):format(where, name, s.step, now - s.since)
  end
  table.sort(parts)
  -- replica groups: how many members are down now against the group's size
  local groups = self.progress and self.progress.groups
  if groups then
    local down = {}
    for _, st in pairs(self.inflight) do
      if st.group and groups[st.group] then down[st.group] = (down[st.group] or 0) + 1 end
    end
    local gparts = {}
    for g, n in pairs(down) do gparts[#gparts + 1] = ("%s %d/%d down"):format(g, n, groups[g].members) end
    table.sort(gparts)
    if #gparts > 0 then parts[#parts + 1] = table.concat(gparts, ", ") end
  end
  local head = self:progress_text()
  local text = #parts > 0 and ("  ▸ " .. table.concat(parts, "  |  ")) or ""
  if head ~= "" then text = head .. text end
  -- never wider than the terminal: a wrapped line cannot be cleared with \r
  text = fit(text, self:columns() - 1)
  self:clear_live()
  self.out:write(text)
  self.out:flush()
  self.width = utf8.len(text) or #text
end

-- ui.history(events_file) -> { [service] = ms }: each service's last successful flow, from the
-- end of the event log (a large log is read from its last 4 MiB only).
function ui.history(path)
  local out = {}
  if not path then return out end
  local f = io.open(path, "r")
  if not f then return out end
  local size = f:seek("end") or 0
  f:seek("set", math.max(0, size - 4 * 1024 * 1024))
  local text = f:read("a") or ""
  f:close()
  for line in text:gmatch("[^\n]+") do
    if line:find('"SERVICE_RESTART_SUCCESS"', 1, true) then
      local service = line:match('"service"%s*:%s*"([^"]+)"')
      local ms = tonumber(line:match('"duration_ms"%s*:%s*(%d+)'))
      if service and ms then out[service] = ms end
    end
  end
  return out
end

-- ui:begin{ order = {names}, parallel = n, history = {service = ms} }: what the progress counts.
-- hosts = { [service] = host } (nil for this machine): with any remote service, the lines say
-- the host of each and the counts go per host.
function ui:begin(info)
  local order = info.order or {}
  self.progress = { order = order, total = #order, done = 0, finished = {}, took = {},
    parallel = info.parallel, history = info.history or {}, t0 = rr.now(), groups = info.groups }
  local remote = false
  for _, name in ipairs(order) do
    if info.hosts and info.hosts[name] then remote = true end
  end
  if remote then
    local p = self.progress
    p.hosts, p.host_total, p.host_done, p.host_list, p.host_width = {}, {}, {}, {}, 0
    for _, name in ipairs(order) do
      local host = info.hosts[name] or ui.LOCAL
      p.hosts[name] = host
      if not p.host_total[host] then
        p.host_list[#p.host_list + 1] = host
        p.host_total[host] = 0
      end
      p.host_total[host] = p.host_total[host] + 1
      p.host_width = math.max(p.host_width, utf8.len(host) or #host)
    end
  end
end

-- line(text[, service]): a line about service starts with its host's column (several hosts).
function ui:line(text, service)
  if self.quiet then return end
  self:clear_live()
  local where = self:host_column(service)
  if self.live then
    self.out:write(where, text, "\n")
  else
    self.out:write(clock(), "  ", where, text, "\n")
  end
  self.out:flush()
  self:draw_live()
end

-- on_step(svc, step): the flow moved on.
function ui:step(svc, step)
  local s = self.inflight[svc.name]
  if not s then
    s = { since = rr.now(), group = svc.group, host = svc.host }
    self.inflight[svc.name] = s
  end
  s.step = step
  if not self.live and not self.quiet then
    if self.progress and self.progress.hosts then
      self:line(("%-24s %s"):format(svc.name, step), svc.name)
    else
      -- without a plan's hosts (a view used alone), a remote service is named NAME@HOST
      self:line(("%-24s %s"):format(svc.host and (svc.name .. "@" .. svc.host) or svc.name, step))
    end
  else
    self:draw_live()
  end
end

-- Starts a ticker that redraws the live line while the run goes on; returns a stop function.
function ui:start_ticker()
  if not self.live then return function() end end
  local stop = false
  local t = rr.spawn(function()
    while not stop do
      self:draw_live()
      rr.sleep(0.25)
    end
  end)
  return function() stop = true; t:cancel(); rr.wait(t); self.ended = true; self:clear_live() end
end

local SHOW = {
  PLAN_START = function(ev)
    if ev.recover then
      return ("recovering interrupted run %s: in flight: %s"):format(ev.recover,
        #ev.order > 0 and table.concat(ev.order, ", ") or "none")
    end
    return ("plan: %d service(s) in order: %s"):format(#ev.order, table.concat(ev.order, ", "))
  end,
  RECOVERY_SUCCESS = function(ev)
    local what = { finished = "finished on the new version", rolled_back = "rolled back to the old version",
      deploy_undone = "deploy undone (the unit was not touched)", nothing_to_undo = "nothing had changed" }
    return ("✔ %-22s recovered: %s (%s)"):format(ev.service, what[ev.action] or tostring(ev.action), fmt_ms(ev.duration_ms))
  end,
  BALANCER_DRAIN = function(ev)
    return ("  %-22s drained at %s (%s%s)"):format(ev.service, tostring(ev.balancer), fmt_ms(ev.duration_ms),
      ev.timed_out and (", %s session(s) left at the drain timeout"):format(tostring(ev.sessions_left)) or "")
  end,
  BALANCER_ENABLE = function(ev) return ("  %-22s back in rotation (%s)"):format(ev.service, tostring(ev.reason)) end,
  BALANCER_FAILED = function(ev) return ("!! %-21s balancer %s failed: %s"):format(ev.service, ev.action, tostring(ev.error)) end,
  CANARY_START = function(ev)
    return ("◆ canary of %s: %s on the new release, soaking %gs"):format(ev.group, table.concat(ev.canaries or {}, ", "),
      ev.soak or 0)
  end,
  CANARY_PASSED = function(ev) return ("◆ canary of %s passed (%s)"):format(ev.group, fmt_ms(ev.duration_ms)) end,
  CANARY_FAILED = function(ev)
    return ("!! canary of %s FAILED: %s — rolling the canaries back; the rest is not touched"):format(ev.group,
      tostring(ev.error))
  end,
  BALANCER_WEIGHT = function(ev)
    return ("  %-22s weight %s at %s (%s)"):format(ev.service, tostring(ev.weight), tostring(ev.balancer),
      tostring(ev.reason))
  end,
  KNOWN_GOOD_RESTORED = function(ev)
    return ("  %-22s known good again: %s (%s)"):format(ev.service, tostring(ev.snapshot), tostring(ev.reason))
  end,
  BLUEGREEN_START = function(ev)
    return ("◆ blue-green %s: %s live, the release goes to %s (%s)"):format(ev.service, tostring(ev.live),
      tostring(ev.idle), tostring(ev.idle_unit))
  end,
  BLUEGREEN_SWITCHED = function(ev)
    return ("◆ blue-green %s: traffic %s from %s to %s (%s)"):format(ev.service, ev.back and "switched back" or "switched",
      tostring(ev.from), tostring(ev.to), fmt_ms(ev.duration_ms))
  end,
  BLUEGREEN_SOAK = function(ev)
    return ("◆ blue-green %s: %s serves, soaking %gs while %s keeps running"):format(ev.service, tostring(ev.live),
      ev.soak or 0, tostring(ev.previous))
  end,
  BLUEGREEN_PASSED = function(ev)
    return ("◆ blue-green %s passed: %s live%s"):format(ev.service, tostring(ev.live),
      ev.old_running and (", but the old colour %s still runs: %s"):format(tostring(ev.previous), tostring(ev.old_running))
        or "")
  end,
  BLUEGREEN_FAILED = function(ev)
    return ("!! blue-green %s FAILED %s: %s"):format(ev.service, tostring(ev.stage), tostring(ev.error))
  end,
  SERVICE_WAITING = function(ev) return ("  %-22s waits: %s"):format(ev.service, ev.reason) end,
  RECOVERY_FAILED = function(ev) return ("!! %-21s not recovered: %s"):format(ev.service, ev.error) end,
  RUN_ABANDONED = function(ev)
    return ("forgot interrupted run %s (in flight: %s)"):format(tostring(ev.abandoned_run),
      #(ev.in_flight or {}) > 0 and table.concat(ev.in_flight, ", ") or "none")
  end,
  SERVICE_RESTART_SUCCESS = function(ev) return ("✔ %-22s %s ok (%s)"):format(ev.service, ev.method, fmt_ms(ev.duration_ms)) end,
  SERVICE_RESTART_FAILED = function(ev)
    local tail = ev.touched == false and "not touched" or (ev.rolled_back and "rolled back" or "ROLLBACK FAILED")
    return ("✘ %-22s failed: %s [%s]"):format(ev.service, ev.error, tail)
  end,
  SERVICE_SKIPPED = function(ev) return ("- %-22s skipped: %s"):format(ev.service, ev.reason) end,
  HEALTH_CHECK_FAILED = function(ev) return ("  %-22s %s-check failed: %s"):format(ev.service, ev.phase, ev.error) end,
  -- migrations_not_undone is said once, by MIGRATION_NOT_UNDONE, when the rollback gets there
  ROLLBACK_START = function(ev) return ("↺ %-22s rolling back: %s"):format(ev.service, ev.reason) end,
  ROLLBACK_SUCCESS = function(ev) return ("↺ %-22s rolled back, healthy again (%s)"):format(ev.service, fmt_ms(ev.duration_ms)) end,
  ROLLBACK_FAILED = function(ev)
    local lines = { ("!! %-21s ROLLBACK FAILED: %s"):format(ev.service, ev.error), "   manual steps:" }
    for i, s in ipairs(ev.manual_steps or {}) do lines[#lines + 1] = ("     %d. %s"):format(i, s) end
    return table.concat(lines, "\n")
  end,
  DEFINITION_RESTORED = function(ev)
    local put, removed = #(ev.restored or {}), #(ev.removed or {})
    local s = put + removed == 0
      and ("  %-22s definition unchanged since the last known good: nothing to put back"):format(ev.service)
      or ("  %-22s definition restored from the last known good (%d file(s) put back, %d removed)")
        :format(ev.service, put, removed)
    if ev.manual and #ev.manual > 0 then
      s = s .. ("\n  %-22s shared drop-ins left as they are, check by hand: %s"):format("", table.concat(ev.manual, ", "))
    end
    return s
  end,
  DEPLOY_END = function(ev) return ("  %-22s deployed (%d new, %d replaced files)"):format(ev.service, ev.created or 0, ev.replaced or 0) end,
  DEPLOY_FAILED = function(ev) return ("  %-22s deploy failed: %s"):format(ev.service, ev.error) end,
  DEPLOY_UNDONE = function(ev) return ("  %-22s code deploy undone"):format(ev.service) end,
  MIGRATION_END = function(ev)
    return ("  %-22s migration %s (%s)"):format(ev.service, ev.error and ("failed: " .. ev.error) or "done", fmt_ms(ev.duration_ms))
  end,
  MIGRATION_OUTPUT = function(ev) return ("  %-22s | %s"):format(ev.service, ev.line) end,
  MIGRATION_NOT_UNDONE = function(ev) return ("! %-22s %s"):format(ev.service, ev.note) end,
  RELOAD_FALLBACK = function(ev) return ("  %-22s reload failed (%s), restarting instead"):format(ev.service, ev.error) end,
  STABILIZE_FAILED = function(ev) return ("  %-22s unstable: %s"):format(ev.service, ev.error) end,
  WARNING = function(ev) return ("! %-22s %s"):format(ev.service or "", ev.warning) end,
  HOOK_FAILED = function(ev) return ("! %-22s hook %s failed: %s"):format(ev.service or "", ev.hook, ev.error) end,
  INTERRUPTED = function(ev) return ("interrupted (%s): no new service starts; %s"):format(ev.signal, ev.note) end,
  PLAN_END = function(ev)
    if ev.recover then
      return ("recovery %s: %d finished, %d rolled back, %d not recovered"):format(ev.result, ev.succeeded,
        ev.rolled_back, ev.failed - ev.rolled_back)
    end
    return ("plan %s: %d ok, %d failed, %d rolled back, %d skipped (%s)"):format(ev.result, ev.succeeded,
      ev.failed, ev.rolled_back, ev.skipped, fmt_ms(ev.duration_ms))
  end,
}

-- view(ev): the events.open view callback.
function ui:event(ev)
  local ended = ev.event == "SERVICE_RESTART_SUCCESS" or ev.event == "SERVICE_RESTART_FAILED"
    or ev.event == "SERVICE_SKIPPED"
  local p = self.progress
  if ended then
    self.inflight[ev.service] = nil
    if p and not p.finished[ev.service] then
      p.finished[ev.service] = true
      p.done = p.done + 1
      if p.hosts and p.hosts[ev.service] then
        local host = p.hosts[ev.service]
        p.host_done[host] = (p.host_done[host] or 0) + 1
      end
      if ev.event == "SERVICE_RESTART_SUCCESS" then p.took[ev.service] = ev.duration_ms end
    end
  end
  local show = SHOW[ev.event]
  if show then
    local text = show(ev)
    if ended and p and p.total > 0 and ev.event ~= "SERVICE_SKIPPED" then
      local host = p.hosts and p.hosts[ev.service]
      if host then
        -- the run's count, then this host's
        text = ("%s  [%d/%d, %s %d/%d]"):format(text, p.done, p.total, host, p.host_done[host], p.host_total[host])
      else
        text = ("%s  [%d/%d]"):format(text, p.done, p.total)
      end
    end
    self:line(text, ev.service)
  end
end

return ui
