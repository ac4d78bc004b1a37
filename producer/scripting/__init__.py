"""Scripts and schedules: ``script`` parses and validates script files, ``timing`` works out
when a schedule fires, ``schedules`` stores schedules and turns firings into runs, ``runs`` moves
a run's lines along, ``beat`` holds the names and RedBeat wiring they share, and ``tasks`` are
the Celery tasks that ``echoq worker`` loads for them."""
