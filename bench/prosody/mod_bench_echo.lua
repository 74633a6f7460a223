-- Prosody module for bench/bench_echo.py: the first example of the seed page
-- (../shared/seed/network-services.txt, "Network services"), reduced to a raw echo: every chunk
-- is written back unchanged, with no greeting and no "You said " prefix, like bench/echo_raw.py
-- for mpnet and bench/baseline_echo.py for uvloop.
--
-- The page says to add net providers "only from global or shared modules", hence set_global().
-- bench_echo.py loads it with plugin_paths pointing at this directory and
-- `modules_enabled = { "bench_echo" }`; the port comes from `bench_echo_ports = { PORT }`.

module:set_global();

local listener = {};

function listener.onincoming(conn, data)
	conn:write(data);
end

module:provides("net", {
	name = "bench_echo";
	listener = listener;
	default_port = 5432;
});
