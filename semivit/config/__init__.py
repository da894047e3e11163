"""Settings: the schema with each setting's default and rule (``schema``), reading a YAML file
with its ``base:`` files and ``key=value`` overrides (``load``), and smoke mode (``smoke``)."""
