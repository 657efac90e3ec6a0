"""Views for people: text panels (``text``), matplotlib pictures (``viz``, drawing the
timeline in ``timeline`` and sharing fonts, lanes and saving in ``figure``), and the path to
a state explained (``explain``)."""
