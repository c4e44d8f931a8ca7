-- rr: the library a plan requires. Tasks and time come from the C core (rr.loop); the
-- primitives are their own modules (rr.systemd, rr.http, rr.proc, rr.log, rr.fs).
local loop = require("rr.loop")

local rr = {}

rr.spawn = loop.spawn
rr.wait = loop.wait
rr.wait_any = loop.wait_any
rr.sleep = loop.sleep
rr.now = loop.now
rr.current = loop.current
rr.on_signal = loop.on_signal
rr.off_signal = loop.off_signal
rr.interrupts = loop.interrupts

-- rr.rolling_restart{ services = {"sso.api"}, services_file = "services.lua", user = true, ... }
-- -> summary { success, exit_code, services_succeeded, services_failed, services_rolled_back,
-- services_skipped, duration_ms, ... } (see lua/rr/rolling.lua for every option).
function rr.rolling_restart(opts)
  return require("rr.rolling").run(opts or {})
end

return rr
