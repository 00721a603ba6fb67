// Salesmsg Connect: small progressive enhancements; every page works without JavaScript.
(function () {
  "use strict";

  // One submission per rendered form (the message composer): the idempotency key makes a repeat
  // harmless anyway. Destructive actions are confirmed in the page, never with window.confirm().
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.hasAttribute("data-once")) {
      if (form.dataset.submitted === "yes") { event.preventDefault(); return; }
      form.dataset.submitted = "yes";
      form.querySelectorAll("button[type=submit]").forEach(function (b) { b.disabled = true; });
    }
  });

  // Copy buttons next to values shown once.
  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var target = document.getElementById(button.getAttribute("data-copy"));
      if (!target) { return; }
      target.select();
      if (navigator.clipboard) { navigator.clipboard.writeText(target.value); }
      button.textContent = "Copied";
    });
  });

  // Live character count for the message composer.
  document.querySelectorAll("textarea[data-count]").forEach(function (area) {
    var out = document.getElementById(area.getAttribute("data-count"));
    var max = parseInt(area.getAttribute("maxlength"), 10);
    function update() { if (out) { out.textContent = area.value.length + " / " + max; } }
    area.addEventListener("input", update);
    update();
  });
})();
