// Live run views: while a run is not finished, the server sends an "update"
// event whenever its status or steps change; re-render the timeline then.
(function () {
  "use strict";
  var timeline = document.getElementById("timeline");
  if (!timeline || !timeline.dataset.live) {
    return;
  }
  var source = new EventSource(timeline.dataset.live);
  var pending = null;

  function refresh() {
    pending = null;
    fetch(timeline.dataset.fragment, { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html !== null) {
          timeline.innerHTML = html;
        }
      });
  }

  function schedule() {
    // Several events in a burst cost one re-render.
    if (pending === null) {
      pending = setTimeout(refresh, 50);
    }
  }

  source.addEventListener("update", schedule);
  source.addEventListener("end", function () {
    source.close();
    clearTimeout(pending);
    refresh();
    timeline.dataset.finished = "true";
  });
})();
