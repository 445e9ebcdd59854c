"""``serve --help``: what a user sets, in pagedserve's words (Hydra's own help is ``--hydra-help``).

The groups, the models and the keys with their defaults are read from the same config store and
repository ``serve`` uses, so the text cannot drift from what the command accepts.
"""

from __future__ import annotations

import importlib.resources
import textwrap

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from pagedserve.repository import ModelRepository

_USAGE = """\
serve: a Triton-compatible inference server: gRPC on server.grpc_port (8001), HTTP/REST on
server.http_port (8000), the OpenAI API on server.openai_port (9000), Prometheus /metrics on
server.metrics_port (8002); all bind server.host, every interface by default.

usage: serve [key=value ...] [group=option ...]
       serve -m key=a,b ...      one job per combination (Hydra multirun; use with check=true)
       serve --info              loaded plugins, versions and what they provide
       serve --help              this text (--hydra-help: Hydra's own flags)

common command lines:
  serve                                          every model with autoload in the repository
  serve model=simple                             only the named model(s): model=[simple,tiny-llama]
  serve model=llama3 engine.load_format=dummy    an LLM with random weights (no checkpoint needed)
  serve model=llama3 engine.weights=/path/to/hf  an LLM from a Hugging Face directory
  serve repository=/my/models model=mymodel      another model repository (a folder of YAML files)
  serve server.grpc_port=0 server.http_port=0     free ports, printed at start
  serve frontends=[grpc]                         only the gRPC front-end (also: http, openai)
  serve check=true model=simple                  load, print the model table, exit (opens no port)
  serve model_control_mode=explicit              load and unload over gRPC (RepositoryModelLoad)

exit codes: 0 stopped cleanly; 1 could not start (port taken, a start-up model failed to load);
2 the command line or configuration is invalid. A second Ctrl-C / SIGTERM exits at once.
"""


def help_text() -> str:
    """The whole ``serve --help`` text."""
    return "\n".join([_USAGE, _groups(), _models(), _keys()])


def _groups() -> str:
    lines = ["groups (group=option):"]
    for group in ("scheduler",):
        lines.append(f"  {group}: {', '.join(_options(group))}")
    return "\n".join(lines) + "\n"


def _options(group: str) -> list[str]:
    """Options of a config group: the shipped YAML files and what plugins stored (schemas excluded)."""
    shipped = importlib.resources.files("pagedserve.conf") / group
    names = {p.name.removesuffix(".yaml") for p in shipped.iterdir() if p.name.endswith(".yaml")}
    stored = ConfigStore.instance().list(group) if ConfigStore.instance().repo.get(group) else []
    names |= {name.removesuffix(".yaml") for name in stored if not name.startswith("base_")}
    return sorted(names)


def _models() -> str:
    path = importlib.resources.files("pagedserve.conf") / "models"
    repository = ModelRepository(path)  # type: ignore[arg-type]
    autoload = set(repository.autoload_names())
    names = [name if name in autoload else f"{name} (not autoloaded)" for name in repository.names()]
    listing = textwrap.fill(", ".join(names), width=100, initial_indent="  ", subsequent_indent="  ")
    return f"models in the default repository ({path}):\n{listing}\n"


def _keys() -> str:
    with initialize_config_module(config_module="pagedserve.conf", version_base=None):
        cfg = compose(config_name="config")
    body = OmegaConf.to_yaml(cfg).rstrip().replace("\n", "\n  ")
    return f"keys and their defaults (key=value, nested keys with dots: server.grpc_port=8002):\n  {body}\n"
