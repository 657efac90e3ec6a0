"""Views for people: text and HTML panels (``text``), matplotlib pictures (``viz``), and the
path to a state explained (``explain``)."""
