// The tenants list and a tenant's page: a slug suggested from the name, and a destructive button
// that waits for the typed confirmation. Both pages work without JavaScript (the server checks).
(function () {
  "use strict";

  function slugify(text) {
    return text.normalize("NFKD").replace(/[\u0300-\u036f]/g, "").toLowerCase()
      .replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 63).replace(/-+$/, "");
  }

  // Suggest the slug from the name until the person edits the slug themselves.
  document.querySelectorAll("input[data-slug-from]").forEach(function (slug) {
    var name = document.getElementById(slug.getAttribute("data-slug-from"));
    if (!name) { return; }
    var edited = slug.value !== "" && slug.value !== slugify(name.value);
    slug.addEventListener("input", function () { edited = slug.value !== ""; });
    name.addEventListener("input", function () {
      if (!edited) { slug.value = slugify(name.value); }
    });
  });

  // A button enabled only once its field holds the exact text (e.g. the tenant's slug).
  document.querySelectorAll("input[data-must-equal]").forEach(function (field) {
    var button = document.getElementById(field.getAttribute("data-enables"));
    if (!button) { return; }
    var expected = field.getAttribute("data-must-equal");
    function update() { button.disabled = field.value.trim().toLowerCase() !== expected; }
    field.addEventListener("input", update);
    update();
  });
})();
