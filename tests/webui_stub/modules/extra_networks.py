"""Stand-in for ``modules/extra_networks.py``: ``ExtraNetworkParams``, ``parse_prompt``, ``parse_prompts`` exactly
as A1111 v1.10.1 parses ``<name:arg1:arg2>`` tags (registration/activation of networks is not here)."""

from __future__ import annotations

import re
from collections import defaultdict

re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    """Mirrors ``extra_networks.ExtraNetworkParams``: ``items`` split into ``positional`` and ``named``
    (an item that ``split('=', 2)`` cuts into two parts)."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}

        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items and self.positional == other.positional and self.named == other.named


def parse_prompt(prompt):
    """Mirrors ``extra_networks.parse_prompt``: returns (prompt without tags, {name: [ExtraNetworkParams]})."""
    res = defaultdict(list)

    def found(m):
        name = m.group(1)
        args = m.group(2)

        res[name].append(ExtraNetworkParams(items=args.split(":")))

        return ""

    prompt = re.sub(re_extra_net, found, prompt)

    return prompt, res


def parse_prompts(prompts):
    """Mirrors ``extra_networks.parse_prompts``: the extra-network data of the FIRST prompt only."""
    res = []
    extra_data = None

    for prompt in prompts:
        updated_prompt, parsed_extra_data = parse_prompt(prompt)

        if extra_data is None:
            extra_data = parsed_extra_data

        res.append(updated_prompt)

    return res, extra_data
