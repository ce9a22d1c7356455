"""Stage 7, selection: task and instance values, quotas, the methods and their registry."""
