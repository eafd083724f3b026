// Shows every <time> in the viewer's time zone; the UTC time stays in the
// title (on hover) and the page reads the same, in UTC, without this script.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var fmt = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
  });
  document.querySelectorAll("time[datetime]").forEach(function (el) {
    var d = new Date(el.getAttribute("datetime"));
    if (isNaN(d.getTime())) { return; }
    el.title = "UTC: " + el.textContent;
    el.textContent = fmt.format(d);
    el.classList.add("local");
  });
});
