"""The memory manager's parts behind :class:`agentkv.AgentMemory`: the RAM tier, the
write-behind saves, the sharing policy the engine is given, the counters, the inspection."""
