// The consent screen: keep each folded group's "N of M selected" true while the person ticks.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const fold of document.querySelectorAll("#consent-form details[data-fold]")) {
    const count = fold.querySelector("[data-count]");
    const boxes = [...fold.querySelectorAll("input[type=checkbox][name=scope]")];
    if (!count || boxes.length === 0) continue;
    fold.addEventListener("change", () => {
      count.textContent = `${boxes.filter((box) => box.checked).length} of ${boxes.length} selected`;
    });
  }
});
