// Progressive enhancement only: every page works without this file.
// "copy" buttons next to permalinks (hidden until this script shows them).
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    const field = document.querySelector(button.dataset.copy);
    if (!field) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
      } catch (error) {
        document.execCommand("copy"); // older browsers, or a page not served over https
      }
      button.textContent = "copied";
      setTimeout(() => { button.textContent = "copy"; }, 1500);
    });
  }
});

// The address bar names the run the page shows, as the permalink box does: a reload, a bookmark
// or a copied address brings back exactly this view, even after a newer run appears.
document.addEventListener("DOMContentLoaded", () => {
  const link = document.querySelector("section.run a.permalink-link");
  if (!link) return;
  const pinned = new URL(link.getAttribute("href"), location.href);
  if (pinned.pathname === location.pathname && pinned.search !== location.search) {
    history.replaceState(history.state, "", pinned.pathname + pinned.search + location.hash);
  }
});
