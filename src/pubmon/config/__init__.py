"""The config: a TOML file read once into frozen dataclasses, and what a reload changes.

- `model`: the dataclasses (`Config`, `PublisherSpec`, ...), the contract the rest of pubmon reads;
- `load`: a file -> `Config`, every problem with its dotted key, all at once (`load_config`);
- `checks`: the field readers `load` uses; `trust`: who may change what the config names;
- `access`: access levels and allow lists (`[control] allow`, `[monitor] allow`, `[http]`);
- `diff`: two configs compared, by one explicit table of what each field change does.
"""
