-- rr: the library a plan requires. Tasks and time come from the C core (rr.loop); the
-- primitives are their own modules (rr.systemd, rr.http, rr.proc, rr.log, rr.fs).
local loop = require("rr.loop")

local rr = {}

rr.spawn = loop.spawn
rr.wait = loop.wait
rr.sleep = loop.sleep
rr.now = loop.now
rr.current = loop.current
rr.on_signal = loop.on_signal
rr.interrupts = loop.interrupts

return rr
