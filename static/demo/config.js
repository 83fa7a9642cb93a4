/* Where the demo pages find the relay. Empty: the relay that serves these pages (/demo/ on the
   relay). A page URL's ?relay=ORIGIN (and ?cid=) overrides this and is remembered for the visit. */
window.PT_DEMO = { relay: '', cid: 'cmp_demo' };
