"""System tests: the job as its users run it, in processes and clusters of its own (a submitted job on a
local head, kills and resumes, a lost node, the cluster configs), rather than one module at a time."""
