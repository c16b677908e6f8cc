// The API key, as the chat page and the learning dashboard ask for it and send it. Both pages come
// from the same server (same origin), so one saved key serves both. Plain JavaScript, no build step.
"use strict";

const selflearnKey = (() => {
  const STORE = "selflearn-api-key";
  const get = () => (localStorage.getItem(STORE) || "").trim();
  return {
    get,
    // Headers for an API call: `extra`, plus the key when one is saved.
    headers(extra = {}) {
      const h = { ...extra };
      const key = get();
      if (key) h["X-API-Key"] = key;
      return h;
    },
    // Fill `input` with the saved key and save what the user types (before any request can read it).
    bind(input, onChange) {
      input.value = get();
      input.addEventListener("input", () => localStorage.setItem(STORE, input.value.trim()));
      if (onChange) input.addEventListener("change", onChange);
    },
  };
})();
