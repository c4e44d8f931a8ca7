-- rrengine plans/timeline.lua [EVENTS_FILE] [--run ID] [-o FILE] [--list]: one run of the event
-- log drawn as an SVG Gantt chart (rr.timeline): a row per service, its phases as coloured
-- spans, failures and rollbacks marked, services in flight over time, a time axis.
local cli = require("rr.cli")
local timeline = require("rr.timeline")

local spec = {
  usage = "rrengine plans/timeline.lua [EVENTS_FILE] [options]",
  summary = "Draw one run of the event log as an SVG timeline: a row per service with its phases "
    .. "(pre-check, deploy, migrate, reload or restart, post-check, stabilize, rollback), failures "
    .. "marked, and how many services were in flight. EVENTS_FILE defaults to the event log of "
    .. "plans/rolling.lua (/var/log/rrengine/events.jsonl; with --user $XDG_STATE_HOME/rrengine/events.jsonl).",
  examples = {
    { "rrengine plans/timeline.lua -o last-run.svg", "the last run in the system event log" },
    { "rrengine plans/timeline.lua events.jsonl --list", "the runs in a file: id, start, result" },
    { "rrengine plans/timeline.lua events.jsonl --run 5f22 -o run.svg", "the run whose id starts with 5f22" },
  },
  options = {
    { name = "run", type = "string", value = "ID", help = "the run to draw: its id or a unique prefix (default: the last run)" },
    { name = "output", short = "o", type = "string", value = "FILE", help = "write the SVG to FILE (default: stdout)" },
    { name = "list", help = "list the runs in the file and exit" },
    { name = "width", type = "number", value = "PX", default = 1100, help = "width of the picture in pixels" },
    { name = "user", help = "read your user event log ($XDG_STATE_HOME/rrengine/events.jsonl) by default" },
    { name = "help", short = "h", help = "show this help" },
  },
  exit_codes = {
    { 0, "the picture was written (or the runs listed)" },
    { 2, "usage error, or the events file cannot be read or holds no such run" },
  },
}

local function die(msg)
  io.stderr:write("rrengine: ", msg, "\n")
  os.exit(2)
end

local opts, err = cli.parse({ ... }, spec)
if not opts then die(err .. " (try --help)") end
if opts.help then io.write(cli.usage(spec)); os.exit(0) end
if #opts.args > 1 then die(("unexpected argument %q (one events file)"):format(opts.args[2])) end
if math.type(opts.width) ~= "integer" or opts.width < 500 or opts.width > 20000 then
  die(("--width must be an integer from 500 to 20000, got %s"):format(tostring(opts.width)))
end

local path = opts.args[1] or require("rr.rolling").default_events_file(opts.user)
local events, skipped = timeline.read(path)
if not events then die(skipped) end
if skipped > 0 then
  io.stderr:write(("rrengine: %s: %d line(s) are not events and were skipped\n"):format(path, skipped))
end

if opts.list then
  local runs = timeline.runs(events)
  if #runs == 0 then die(path .. ": the events file holds no run") end
  for _, r in ipairs(runs) do
    io.write(("%s  %s  %-9s %3d service(s)  %s\n"):format(r.id, r.ts, r.result or "-", r.services,
      timeline.format_duration(r.t1 - r.t0)))
  end
  os.exit(0)
end

local model, berr = timeline.build(events, opts.run)
if not model then die(path .. ": " .. berr) end
local svg = timeline.svg(model, { width = opts.width })
if opts.output and opts.output ~= "-" then
  local ok, werr = require("rr.fs").write_atomic(opts.output, svg, { mode = 420 })
  if not ok then die(("cannot write %s: %s"):format(opts.output, werr)) end
  io.stderr:write(("rrengine: run %s (%d service(s)) drawn in %s\n"):format(model.run, #model.rows, opts.output))
else
  io.write(svg)
end
