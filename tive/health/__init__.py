"""Health checks: what makes a selection untrustworthy without failing it (an untrained
reference, degenerate or collapsed features, key parameters not hooked, a fallen-back
projection, an outlier task, repeats, misapplied task rules, stale data), each found as one
line with its fix, and the stability of a selection across seeds and stores
(docs/design.md, "Health checks")."""
