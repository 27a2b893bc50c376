"""The compiler report (`spmd explain`) and the automatic planner (`spmd plan`)."""
