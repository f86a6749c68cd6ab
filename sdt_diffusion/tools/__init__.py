"""User-facing tools on top of the library: the CPU demo, decay-map pictures and the console scripts."""
