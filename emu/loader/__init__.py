"""Images and how they are loaded: keystone assembly (``asm``, ``link``, ``image``), PE files
(``pe``, ``binding``), service stubs (``stubs``), thread start (``startup``), and the data the
loader leaves in the process (``loader_data``, ``callback_table``)."""
