"""``tgops demo``: a whole fleet on this machine, simulated, with a console.

- ``demo``: builds the demo's directory (sandbox nodes, a signed local repository, mail and
  phone stand-ins) and runs the service in it.
- ``console``: the interactive ``tg>`` prompt.
- ``debbuild``: builds the demo's ``.deb`` packages byte for byte reproducibly.

May import: everything; nothing imports it but ``bot.cli``.
"""
