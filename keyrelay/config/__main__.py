"""``python -m keyrelay.config``: print the annotated example file
(postfix-conf/keyrelay.yaml.example)."""

from .example import render_example

print(render_example(), end="")
