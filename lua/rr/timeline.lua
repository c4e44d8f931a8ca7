-- rr.timeline: one run of the event log as a picture. The events file is read (one JSON object
-- a line), the run's events become a row per service with the phases of its flow as spans
-- (pre-check, deploy, migrate, reload or restart, post-check, stabilize, rollback), failures as
-- marks, and the model is drawn as a self-contained SVG Gantt chart: time axis, services in
-- flight, legend, a tooltip (<title>) on every span.
--
-- Times come from the events only (`ts`, and `duration_ms` of an event that ends a step: a
-- health check or a unit job reports its duration when it ends, so its span is [ts - duration,
-- ts]). A step with a start event and no end (the engine was killed) is drawn up to the last
-- event of its service and marked unfinished.
local timeline = {}

-- Phases in flow order, with their colours (legend order too).
timeline.PHASES = { "pre-check", "deploy", "migrate", "daemon-reload", "reload", "restart", "post-check", "stabilize",
  "rollback" }
timeline.COLORS = {
  ["pre-check"] = "#9ecae1", deploy = "#b39ddb", migrate = "#f48fb1", ["daemon-reload"] = "#bcaaa4", reload = "#80deea",
  restart = "#26a69a", ["post-check"] = "#64b5f6", stabilize = "#aed581", rollback = "#ffb74d",
}
local FAILURE_COLOR = "#d32f2f"

-- A JSON number as Lua reads it back from cjson (2.0) shown as it was written (2).
local function int(v)
  return type(v) == "number" and math.tointeger(v) or v
end

-- Days since 1970-01-01 of a civil date (H. Hinnant's algorithm): no os.time, whose result
-- depends on the local time zone.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m > 2 and m - 3 or m + 9) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

-- timeline.parse_ts("2026-01-02T03:04:05.678Z") -> milliseconds since the epoch | nil.
-- RFC 3339 with Z or a +hh:mm / -hh:mm offset; fractions of any length.
function timeline.parse_ts(s)
  if type(s) ~= "string" then return nil end
  local y, mo, d, h, mi, sec, frac, zone = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)[Tt ](%d%d):(%d%d):(%d%d)(%.?%d*)(.*)$")
  if not y then return nil end
  y, mo, d, h, mi, sec = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(sec)
  if mo < 1 or mo > 12 or d < 1 or d > 31 or h > 23 or mi > 59 or sec > 60 then return nil end
  local offset = 0
  if zone == "Z" or zone == "z" then
    offset = 0
  else
    local sign, oh, om = zone:match("^([+-])(%d%d):(%d%d)$")
    if not sign then return nil end
    offset = (tonumber(oh) * 60 + tonumber(om)) * (sign == "+" and 1 or -1)
  end
  if frac == "." then return nil end
  local ms = frac ~= "" and math.floor(tonumber("0" .. frac) * 1000 + 0.5) or 0
  local minutes = (days_from_civil(y, mo, d) * 24 + h) * 60 + mi - offset
  return (minutes * 60 + sec) * 1000 + ms
end

-- timeline.read(path) -> events, skipped | nil, err, code. Every line that is a JSON object
-- with an `event` name and a readable `ts`, in file order; `skipped` counts the others (a torn
-- last line, a foreign line) so that the caller can say so.
function timeline.read(path)
  if type(path) ~= "string" then error("rr.timeline.read: path must be a string, got " .. type(path), 2) end
  local cjson = require("cjson.safe")
  local file, err, errno = io.open(path, "rb")
  if not file then
    local code = errno == 2 and "ENOENT" or (errno == 13 and "EACCES" or "EIO")
    return nil, ("cannot read the events file %s: %s"):format(path, (tostring(err):gsub("^.-: ", ""))), code
  end
  local events, skipped = {}, 0
  -- a directory opens but does not read: say so instead of raising from the loop
  local probe, read_err = file:read(0)
  if probe == nil and read_err then
    file:close()
    return nil, ("cannot read the events file %s: %s"):format(path, read_err), "EIO"
  end
  for line in file:lines() do
    if line:find("%S") then
      local ev = cjson.decode(line)
      if type(ev) == "table" and type(ev.event) == "string" and timeline.parse_ts(ev.ts) then
        events[#events + 1] = ev
      else
        skipped = skipped + 1
      end
    end
  end
  file:close()
  return events, skipped
end

-- timeline.runs(events) -> list of { id, ts, t0, t1, result, exit_code, services, events } in the
-- order the runs first appear; t0/t1 in epoch milliseconds.
function timeline.runs(events)
  local list, by_id = {}, {}
  for _, ev in ipairs(events) do
    local id = ev.run
    if type(id) == "string" then
      local r = by_id[id]
      local ms = timeline.parse_ts(ev.ts)
      if not r then
        r = { id = id, ts = ev.ts, t0 = ms, t1 = ms, services = 0, events = 0, seen = {} }
        by_id[id] = r
        list[#list + 1] = r
      end
      r.events = r.events + 1
      if ms < r.t0 then r.t0, r.ts = ms, ev.ts end
      if ms > r.t1 then r.t1 = ms end
      if type(ev.service) == "string" and not r.seen[ev.service] then
        r.seen[ev.service] = true
        r.services = r.services + 1
      end
      if ev.event == "PLAN_END" then r.result, r.exit_code = ev.result, int(ev.exit_code) end
    end
  end
  for _, r in ipairs(list) do r.seen = nil end
  return list
end

-- The run `want` names (its id or a unique prefix), or the last run when want is nil.
local function pick_run(runs, want)
  if #runs == 0 then return nil, "the events file holds no run", "ENORUN" end
  if want == nil then return runs[#runs] end
  local found
  for _, r in ipairs(runs) do
    if r.id == want then return r end
    if r.id:sub(1, #want) == want then
      if found then return nil, ("run %q is ambiguous: %s, %s, ..."):format(want, found.id, r.id), "EAMBIGUOUS" end
      found = r
    end
  end
  if not found then return nil, ("no run %q in the events file"):format(want), "ENORUN" end
  return found
end

-- Which phase a health check's `phase` field belongs to (nil: inside a rollback).
local CHECK_PHASE = { pre = "pre-check", post = "post-check", final = "post-check" }

-- Events that end a step with a failure: their text goes into a mark.
local FAILURE_EVENTS = {
  HEALTH_CHECK_FAILED = true, UNIT_JOB_FAILED = true, DEPLOY_FAILED = true, STABILIZE_FAILED = true,
  DAEMON_RELOAD_FAILED = true, HOOK_FAILED = true, ROLLBACK_FAILED = true, RELOAD_FALLBACK = true,
}

local function text_of(v)
  if v == nil then return nil end
  if type(v) == "table" then
    local parts = {}
    for _, item in ipairs(v) do parts[#parts + 1] = tostring(item) end
    return table.concat(parts, " ")
  end
  return tostring(int(v))
end

-- timeline.build(events, run) -> model | nil, err, code. `run`: an id, a unique prefix, or nil
-- for the last run in events. The model (times in ms from the run's first event):
--   { run, ts, duration, result, exit_code, finished, max_parallel, interrupts = { {at, signal} },
--     rows = { { service, unit, from, to, outcome, error,
--                spans = { { phase, from, to, failed, open, detail } },
--                marks = { { at, kind = "failure", text } } } } }
-- outcome: "ok", "rolled back", "rollback failed", "failed" (not touched), "skipped",
-- "unfinished" (no end event: the run was cut short).
function timeline.build(events, want)
  if type(events) ~= "table" then error("rr.timeline.build: events must be a list, got " .. type(events), 2) end
  if want ~= nil and type(want) ~= "string" then error("rr.timeline.build: run must be a string", 2) end
  local run, err, code = pick_run(timeline.runs(events), want)
  if not run then return nil, err, code end

  local t0 = run.t0
  local model = { run = run.id, ts = run.ts, duration = run.t1 - t0, result = run.result, exit_code = run.exit_code,
    finished = run.result ~= nil, interrupts = {}, rows = {} }
  local rows, order = {}, {}

  local function row_of(ev, at)
    local name = ev.service
    local row = rows[name]
    if not row then
      row = { service = name, unit = ev.unit, from = at, to = at, spans = {}, marks = {}, open = {} }
      rows[name] = row
      order[#order + 1] = name
    end
    row.unit = row.unit or ev.unit
    if at < row.from then row.from = at end
    if at > row.to then row.to = at end
    return row
  end
  local function add_span(row, phase, from, to, fields)
    local span = { phase = phase, from = math.max(from, 0), to = to }
    for k, v in pairs(fields or {}) do span[k] = v end
    row.spans[#row.spans + 1] = span
    if span.from < row.from then row.from = span.from end
    return span
  end
  local function open_span(row, phase, at, detail)
    row.open[phase] = add_span(row, phase, at, at, { open = true, detail = detail })
  end
  local function close_span(row, phase, at, failed, detail, duration)
    local span = row.open[phase]
    if span then
      row.open[phase] = nil
      span.to, span.open = at, nil
    else
      span = add_span(row, phase, at - (duration or 0), at)
    end
    span.failed = failed or nil
    if detail then span.detail = span.detail and (span.detail .. "; " .. detail) or detail end
    return span
  end

  local plan_order
  for _, ev in ipairs(events) do
    if ev.run == run.id then
      local at = timeline.parse_ts(ev.ts) - t0
      local name = ev.event
      local ms = tonumber(ev.duration_ms)
      if name == "PLAN_START" and type(ev.order) == "table" then
        plan_order = ev.order
        model.parallel = int(ev.parallel)
      elseif name == "INTERRUPTED" then
        model.interrupts[#model.interrupts + 1] = { at = at, signal = text_of(ev.signal) or "signal" }
      elseif type(ev.service) == "string" then
        local row = row_of(ev, at)
        local in_rollback = row.open["rollback"] ~= nil
        local previous = row.last_at or at
        row.last_at = at
        if FAILURE_EVENTS[name] or (name == "MIGRATION_END" and (ev.error or (ev.exit_code or 0) ~= 0)) then
          row.marks[#row.marks + 1] = { at = at, kind = "failure",
            text = name .. (ev.error and (": " .. text_of(ev.error)) or "") }
        end
        if name == "HEALTH_CHECK_PASSED" or name == "HEALTH_CHECK_FAILED" then
          local phase = CHECK_PHASE[ev.phase]
          if phase and not in_rollback then
            local detail = (ev.phase == "final" and "final check" or (ev.phase .. "-check"))
              .. (ev.detail and (": " .. text_of(ev.detail)) or "") .. (ev.error and (": " .. text_of(ev.error)) or "")
            close_span(row, phase, at, name == "HEALTH_CHECK_FAILED", detail, ms)
          end
        elseif name == "DEPLOY_START" then
          open_span(row, "deploy", at, ev.source and ("from " .. text_of(ev.source)) or nil)
        elseif name == "DEPLOY_END" or name == "DEPLOY_FAILED" then
          local detail = name == "DEPLOY_END" and ("%s created, %s replaced"):format(tostring(ev.created or 0),
            tostring(ev.replaced or 0)) or text_of(ev.error)
          close_span(row, "deploy", at, name == "DEPLOY_FAILED", detail, ms)
        elseif name == "MIGRATION_START" then
          open_span(row, "migrate", at, text_of(ev.command))
        elseif name == "MIGRATION_END" then
          local failed = ev.error ~= nil or (ev.exit_code or 0) ~= 0
          close_span(row, "migrate", at, failed, failed and (text_of(ev.error) or ("exit code " .. tostring(ev.exit_code))) or nil, ms)
        elseif (name == "UNIT_JOB_DONE" or name == "UNIT_JOB_FAILED") and not in_rollback
            and (ev.method == "restart" or ev.method == "reload") then
          close_span(row, ev.method, at, name == "UNIT_JOB_FAILED",
            name == "UNIT_JOB_FAILED" and text_of(ev.error) or text_of(ev.result), ms or 0)
        elseif (name == "DAEMON_RELOAD" or name == "DAEMON_RELOAD_FAILED") and not in_rollback then
          -- emitted when the reload is done; it began when the step before it ended
          close_span(row, "daemon-reload", at, name == "DAEMON_RELOAD_FAILED", text_of(ev.error), at - previous)
        elseif name == "STABILIZE_START" then
          open_span(row, "stabilize", at, ev.seconds and (tostring(ev.seconds) .. " s") or nil)
        elseif name == "STABILIZE_END" or name == "STABILIZE_FAILED" then
          close_span(row, "stabilize", at, name == "STABILIZE_FAILED", text_of(ev.error), ms)
        elseif name == "ROLLBACK_START" then
          open_span(row, "rollback", at, text_of(ev.reason))
        elseif name == "ROLLBACK_SUCCESS" or name == "ROLLBACK_FAILED" then
          close_span(row, "rollback", at, name == "ROLLBACK_FAILED", name == "ROLLBACK_FAILED" and text_of(ev.error) or nil, ms)
          if not row.outcome or row.outcome == "unfinished" then
            row.outcome = name == "ROLLBACK_SUCCESS" and "rolled back" or "rollback failed"
          end
        elseif name == "SERVICE_RESTART_SUCCESS" then
          row.outcome = "ok"
          row.method = ev.method
        elseif name == "SERVICE_RESTART_FAILED" then
          row.error = text_of(ev.error)
          if ev.rolled_back == true then
            row.outcome = "rolled back"
          elseif ev.rolled_back == false and ev.rollback_error ~= nil then
            row.outcome = "rollback failed"
          else
            row.outcome = "failed"
          end
        elseif name == "SERVICE_SKIPPED" then
          row.outcome = row.outcome or "skipped"
          row.error = text_of(ev.reason)
        end
      end
    end
  end

  -- Services the plan named but no event mentions (a run cut short before them) get a row.
  for _, name in ipairs(plan_order or {}) do
    if type(name) == "string" and not rows[name] then
      rows[name] = { service = name, from = model.duration, to = model.duration, spans = {}, marks = {}, open = {},
        outcome = model.finished and "skipped" or "not started" }
      order[#order + 1] = name
    end
  end

  for _, name in ipairs(order) do
    local row = rows[name]
    for _, span in pairs(row.open) do
      span.to = math.max(row.to, span.from)
    end
    row.open, row.last_at = nil, nil
    row.outcome = row.outcome or "unfinished"
    table.sort(row.spans, function(a, b) return a.from < b.from end)
    model.rows[#model.rows + 1] = row
  end

  -- The most services in flight at once: a service is in flight from its first to its last event.
  local edges = {}
  for _, row in ipairs(model.rows) do
    if #row.spans > 0 then
      edges[#edges + 1] = { row.from, 1 }
      edges[#edges + 1] = { row.to, -1 }
    end
  end
  table.sort(edges, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
  local now, peak = 0, 0
  for _, e in ipairs(edges) do
    now = now + e[2]
    if now > peak then peak = now end
  end
  model.max_parallel = peak
  model.in_flight = edges
  return model
end

-- ---------------------------------------------------------------------------- SVG

-- Text fit for XML 1.0: markup escaped, control characters dropped, invalid UTF-8 replaced.
local function xml(s)
  s = tostring(s):gsub("[%z\1-\8\11\12\14-\31\127]", "")
  if not utf8.len(s) then s = s:gsub("[\128-\255]", "?") end
  return (s:gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&apos;" }))
end

-- "850 ms", "2.5 s", "3 min 20 s".
function timeline.format_duration(ms)
  ms = math.floor(ms + 0.5)
  if ms < 1000 then return ("%d ms"):format(ms) end
  if ms < 60000 then
    local s = ms / 1000
    return (s == math.floor(s) and ("%d s"):format(s)) or (s < 10 and ("%.1f s"):format(s)) or ("%d s"):format(math.floor(s + 0.5))
  end
  local minutes, seconds = ms // 60000, math.floor((ms % 60000) / 1000 + 0.5)
  if seconds == 60 then minutes, seconds = minutes + 1, 0 end
  if minutes >= 60 then
    return ("%d h %d min"):format(minutes // 60, minutes % 60)
  end
  return seconds == 0 and ("%d min"):format(minutes) or ("%d min %d s"):format(minutes, seconds)
end

-- A tick step (1, 2 or 5 x 10^k ms, or whole minutes and hours) giving at most `max` ticks.
local function tick_step(total, max)
  local steps = {}
  local k = 1
  while k <= 1e9 do
    for _, m in ipairs({ 1, 2, 5 }) do steps[#steps + 1] = m * k end
    k = k * 10
  end
  local human = { 15000, 30000, 60000, 120000, 300000, 600000, 900000, 1800000, 3600000, 7200000 }
  for _, step in ipairs(steps) do
    if step >= 10000 then break end
    if total / step <= max then return step end
  end
  for _, step in ipairs(human) do
    if total / step <= max then return step end
  end
  local step = 7200000
  while total / step > max do step = step * 2 end
  return step
end

local OUTCOME_MARK = {
  ok = "✔", ["rolled back"] = "↺", ["rollback failed"] = "✘", failed = "✘", skipped = "–",
  unfinished = "…", ["not started"] = "–",
}

-- timeline.svg(model [, opts]) -> string. opts.width (pixels, default 1100).
function timeline.svg(model, opts)
  if type(model) ~= "table" or type(model.rows) ~= "table" then
    error("rr.timeline.svg: model must come from timeline.build", 2)
  end
  opts = opts or {}
  local W = math.max(tonumber(opts.width) or 1100, 500)
  local LEFT, RIGHT, TOP, ROW, STRIP = 230, 40, 64, 28, 36
  local plot = W - LEFT - RIGHT
  local total = math.max(model.duration, 1)
  local rows_top = TOP + STRIP + 8
  local axis_y = rows_top + #model.rows * ROW + 4
  local legend_y = axis_y + 34
  local H = legend_y + 48
  local function x(t) return LEFT + t / total * plot end
  local function fmt(n) return ("%.1f"):format(n) end

  local out = {}
  local function put(s) out[#out + 1] = s end
  put('<?xml version="1.0" encoding="UTF-8"?>\n')
  put(('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
    .. 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">\n'):format(W, H, W, H))
  put("<title>" .. xml("rrengine run " .. model.run) .. "</title>\n")
  put('<style>.span{stroke:#37474f;stroke-width:0.5}.failed{stroke:' .. FAILURE_COLOR .. ';stroke-width:2}'
    .. '.open{stroke-dasharray:4 2;stroke-width:1.5}.label{fill:#212121}.muted{fill:#757575}'
    .. '.grid{stroke:#e0e0e0;stroke-width:1}.mark{fill:' .. FAILURE_COLOR .. '}</style>\n')
  put(('<rect x="0" y="0" width="%d" height="%d" fill="#ffffff"/>\n'):format(W, H))

  -- Header: what run, when, how it ended.
  local result = model.result or "unfinished (no PLAN_END: the run was cut short, or is still going)"
  local head = ("run %s  ·  %s  ·  %s"):format(model.run, model.ts, timeline.format_duration(model.duration))
  put(('<text class="label" x="16" y="24" font-size="16" font-weight="bold">%s</text>\n'):format(xml("rrengine timeline")))
  put(('<text class="label" x="16" y="44">%s</text>\n'):format(xml(head)))
  local summary = ("result: %s%s  ·  %d service(s)  ·  at most %d in flight%s"):format(result,
    model.exit_code and (" (exit " .. tostring(model.exit_code) .. ")") or "", #model.rows, model.max_parallel or 0,
    model.parallel and (" (--parallel " .. tostring(model.parallel) .. ")") or "")
  put(('<text class="muted" x="16" y="%d">%s</text>\n'):format(TOP - 4, xml(summary)))

  -- Services in flight over time: a step chart, so that parallelism shows at a glance.
  local peak = math.max(model.max_parallel or 0, 1)
  put(('<g class="in-flight"><text class="muted" x="16" y="%d">in flight</text>\n'):format(TOP + STRIP / 2 + 4))
  local now, last = 0, 0
  for _, e in ipairs(model.in_flight or {}) do
    if e[1] > last and now > 0 then
      local h = (STRIP - 6) * now / peak
      put(('<rect x="%s" y="%s" width="%s" height="%s" fill="#90a4ae"><title>%s</title></rect>\n'):format(
        fmt(x(last)), fmt(TOP + STRIP - h), fmt(math.max(x(e[1]) - x(last), 0.5)), fmt(h),
        xml(("%d in flight, %s to %s"):format(now, timeline.format_duration(last), timeline.format_duration(e[1])))))
    end
    now, last = now + e[2], e[1]
  end
  put(('<line class="grid" x1="%d" y1="%d" x2="%d" y2="%d"/></g>\n'):format(LEFT, TOP + STRIP, W - RIGHT, TOP + STRIP))

  -- Time axis and grid.
  local step = tick_step(total, math.max(plot // 90, 2))
  put('<g class="axis">\n')
  local t = 0
  while t <= total + 0.5 do
    put(('<line class="grid" x1="%s" y1="%d" x2="%s" y2="%d"/>\n'):format(fmt(x(t)), TOP, fmt(x(t)), axis_y))
    put(('<text class="muted" x="%s" y="%d" text-anchor="middle">%s</text>\n'):format(fmt(x(t)), axis_y + 16,
      xml(t == 0 and "0" or timeline.format_duration(t))))
    t = t + step
  end
  put(('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#9e9e9e"/>\n'):format(LEFT, axis_y, W - RIGHT, axis_y))
  put("</g>\n")

  -- One row per service.
  for i, row in ipairs(model.rows) do
    local y = rows_top + (i - 1) * ROW
    put(('<g class="row" data-service="%s" data-outcome="%s">\n'):format(xml(row.service), xml(row.outcome)))
    if i % 2 == 0 then
      put(('<rect x="0" y="%d" width="%d" height="%d" fill="#f5f5f5"/>\n'):format(y, W, ROW))
    end
    local name = row.service
    if utf8.len(name) and utf8.len(name) > 26 then name = name:sub(1, utf8.offset(name, 26) - 1) .. "…" end
    local bad = row.outcome ~= "ok"
    put(('<text x="16" y="%d" class="label"%s>%s %s<title>%s</title></text>\n'):format(y + ROW / 2 + 4,
      bad and (' fill="' .. FAILURE_COLOR .. '"') or "", xml(OUTCOME_MARK[row.outcome] or "?"), xml(name),
      xml(("%s (%s): %s%s"):format(row.service, row.unit or "?", row.outcome, row.error and (" — " .. row.error) or ""))))
    if #row.spans > 0 then
      put(('<line x1="%s" y1="%d" x2="%s" y2="%d" stroke="#bdbdbd" stroke-width="2"/>\n'):format(
        fmt(x(row.from)), y + ROW / 2, fmt(x(row.to)), y + ROW / 2))
    end
    for _, span in ipairs(row.spans) do
      local x1 = x(span.from)
      local w = math.max(x(span.to) - x1, 2) -- a 5 ms job in a 10 min run still shows
      local class = "span phase-" .. span.phase .. (span.failed and " failed" or "") .. (span.open and " open" or "")
      local tip = ("%s %s: %s%s%s%s"):format(row.service, span.phase, timeline.format_duration(span.to - span.from),
        span.failed and " — FAILED" or "", span.open and " — unfinished" or "", span.detail and (" — " .. span.detail) or "")
      put(('<rect class="%s" x="%s" y="%d" width="%s" height="%d" rx="2" fill="%s"><title>%s</title></rect>\n'):format(
        class, fmt(x1), y + 6, fmt(w), ROW - 12, timeline.COLORS[span.phase] or "#cccccc", xml(tip)))
    end
    for _, mark in ipairs(row.marks) do
      local mx = x(mark.at)
      put(('<path class="mark" d="M%s %d l5 -8 h-10 z"><title>%s</title></path>\n'):format(fmt(mx), y + 6, xml(mark.text)))
    end
    put("</g>\n")
  end

  for _, intr in ipairs(model.interrupts) do
    local ix = x(intr.at)
    put(('<g class="interrupt"><line x1="%s" y1="%d" x2="%s" y2="%d" stroke="%s" stroke-width="1.5" stroke-dasharray="6 3"/>'
      .. '<text x="%s" y="%d" fill="%s" text-anchor="middle">%s</text></g>\n'):format(fmt(ix), TOP, fmt(ix), axis_y,
      FAILURE_COLOR, fmt(ix), TOP - 4 + 0, FAILURE_COLOR, xml("interrupted (" .. intr.signal .. ")")))
  end

  -- Legend.
  put('<g class="legend">\n')
  local lx = 16
  for _, phase in ipairs(timeline.PHASES) do
    put(('<rect x="%d" y="%d" width="14" height="12" rx="2" fill="%s" stroke="#37474f" stroke-width="0.5"/>'
      .. '<text class="label" x="%d" y="%d">%s</text>\n'):format(lx, legend_y, timeline.COLORS[phase], lx + 18, legend_y + 10, xml(phase)))
    lx = lx + 26 + #phase * 7
  end
  lx, legend_y = 16, legend_y + 22
  put(('<rect x="%d" y="%d" width="14" height="12" rx="2" fill="#ffffff" stroke="%s" stroke-width="2"/>'
    .. '<text class="label" x="%d" y="%d">failed</text>\n'):format(lx, legend_y, FAILURE_COLOR, lx + 18, legend_y + 10))
  lx = lx + 70
  put(('<path class="mark" d="M%d %d l5 -8 h-10 z"/><text class="label" x="%d" y="%d">failure event</text>\n'):format(
    lx + 5, legend_y + 11, lx + 14, legend_y + 10))
  lx = lx + 110
  put(('<text class="label" x="%d" y="%d">✔ ok  ↺ rolled back  ✘ failed  – skipped  … unfinished</text>\n'):format(lx, legend_y + 10))
  put("</g>\n</svg>\n")
  return table.concat(out)
end

return timeline
